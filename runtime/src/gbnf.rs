//! llama.cpp's GBNF grammars, written again in the Lark-like syntax that
//! llguidance compiles. The two read alike: sequences, `|`, groups, `* + ?`
//! and `{m,n}` carry over as they are. What changes is spelling: each rule
//! gets a Lark rule name (lowercase, so never a Lark terminal), character
//! classes and `.` become regular expressions of one character, `root`
//! becomes Lark's `start`, and every rule goes on one line (GBNF lets a
//! rule run over lines; Lark ends one at a newline).
//!
//! And strings go one character a literal. GBNF matches characters, but
//! each Lark literal is a lexeme, which llguidance's lexer takes whole and
//! greedily: `"red" | [a-z]{3,5}` as two lexemes could never give `rex`
//! (after `re` only `red` is still open), where one character a lexeme
//! keeps every sentence of the grammar reachable.

use std::collections::HashMap;

/// The most rules a grammar may have: the compiler follows references
/// depth first, so a long chain of rules is a deep recursion (natively on
/// a stack of its own; in WebAssembly on the caller's, about 1 MiB).
#[cfg(not(target_arch = "wasm32"))]
pub const MAX_RULES: usize = 1000;
#[cfg(target_arch = "wasm32")]
pub const MAX_RULES: usize = 100;

/// The Lark grammar of a GBNF one, or what is wrong with it (with its line).
pub fn to_lark(gbnf: &str) -> Result<String, String> {
    let tokens = lex(gbnf)?;
    // A rule starts where a name is followed by `::=`; its body runs to the next one.
    let starts: Vec<usize> = (0..tokens.len()).filter(|&i| matches!(&tokens[i..], [(Tok::Name(_), _), (Tok::Define, _), ..])).collect();
    match (starts.first(), tokens.first()) {
        (_, None) => return Err("the grammar is empty".into()),
        (Some(0), _) => {}
        (_, Some((_, line))) => return Err(format!("line {line}: expected a rule (`name ::= ...`)")),
    }
    let mut names: HashMap<&str, String> = HashMap::new();
    for &s in &starts {
        let (Tok::Name(name), line) = &tokens[s] else { unreachable!("rules start at names") };
        let lark = format!("r{}-{}", names.len(), name.to_ascii_lowercase());
        if names.insert(name, lark).is_some() {
            return Err(format!("line {line}: rule {name} is defined twice"));
        }
    }
    let Some(root) = names.get("root") else { return Err("the grammar has no root rule (`root ::= ...`), where generation starts".into()) };
    if names.len() > MAX_RULES {
        return Err(format!("the grammar has {} rules; at most {MAX_RULES} are taken", names.len()));
    }
    let mut out = format!("start: {root}\n");
    for (k, &s) in starts.iter().enumerate() {
        let end = starts.get(k + 1).copied().unwrap_or(tokens.len());
        let (Tok::Name(name), line) = &tokens[s] else { unreachable!("rules start at names") };
        let body = &tokens[s + 2..end];
        if body.is_empty() {
            return Err(format!("line {line}: rule {name} is empty"));
        }
        out += &names[name.as_str()];
        out += ":";
        for (k, (t, line)) in body.iter().enumerate() {
            out.push(' ');
            match t {
                Tok::Name(n) => out += names.get(n.as_str()).ok_or_else(|| format!("line {line}: rule {n} is used but never defined"))?,
                Tok::Literal(text) => {
                    let repeated = matches!(body.get(k + 1), Some((Tok::Punct("*" | "+" | "?") | Tok::Repeat(_), _)));
                    out += &literal(text, repeated);
                }
                Tok::Class { negated, items } => out += &class_regex(*negated, items),
                Tok::Any => out += r"/[\x{0}-\x{10FFFF}]/",
                Tok::Punct(p) => out += p,
                Tok::Repeat(r) => out += r,
                Tok::Define => return Err(format!("line {line}: `::=` with no rule name before it")),
            }
        }
        out.push('\n');
    }
    Ok(out)
}

#[derive(Debug, PartialEq)]
enum Tok {
    Name(String),
    Define,
    Literal(String),
    /// `[...]`: single characters and ranges, as inclusive pairs.
    Class {
        negated: bool,
        items: Vec<(char, char)>,
    },
    Any,
    Punct(&'static str),
    /// `{m}`, `{m,}`, `{m,n}` or `{,n}`, as written less spaces.
    Repeat(String),
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// The tokens of a grammar, each with its line.
fn lex(src: &str) -> Result<Vec<(Tok, usize)>, String> {
    let mut out = Vec::new();
    let mut it = src.chars().peekable();
    let mut line = 1;
    while let Some(c) = it.next() {
        let tok = match c {
            '\n' => {
                line += 1;
                continue;
            }
            c if c.is_whitespace() => continue,
            '#' => {
                while it.next_if(|&c| c != '\n').is_some() {}
                continue;
            }
            ':' if it.next_if_eq(&':').is_some() && it.next_if_eq(&'=').is_some() => Tok::Define,
            '"' => {
                let mut text = String::new();
                loop {
                    match it.next() {
                        None | Some('\n') => return Err(format!("line {line}: a string is not closed")),
                        Some('"') => break,
                        Some('\\') => text.push(escape(&mut it, line)?),
                        Some(c) => text.push(c),
                    }
                }
                Tok::Literal(text)
            }
            '[' => {
                let negated = it.next_if_eq(&'^').is_some();
                let mut items = Vec::new();
                loop {
                    let lo = match it.next() {
                        None | Some('\n') => return Err(format!("line {line}: a character class is not closed")),
                        Some(']') => break,
                        Some('\\') => escape(&mut it, line)?,
                        Some(c) => c,
                    };
                    let mut hi = lo;
                    if it.peek() == Some(&'-') {
                        let mut ahead = it.clone();
                        ahead.next();
                        if ahead.peek().is_some_and(|&c| c != ']') {
                            it.next();
                            hi = match it.next() {
                                Some('\\') => escape(&mut it, line)?,
                                None | Some('\n') => return Err(format!("line {line}: a character class is not closed")),
                                Some(c) => c,
                            };
                            if hi < lo {
                                return Err(format!("line {line}: the range {lo:?}-{hi:?} runs backwards"));
                            }
                        }
                    }
                    items.push((lo, hi));
                }
                if items.is_empty() && !negated {
                    return Err(format!("line {line}: an empty character class ([]) matches nothing"));
                }
                Tok::Class { negated, items }
            }
            '.' => Tok::Any,
            '(' => Tok::Punct("("),
            ')' => Tok::Punct(")"),
            '|' => Tok::Punct("|"),
            '*' => Tok::Punct("*"),
            '+' => Tok::Punct("+"),
            '?' => Tok::Punct("?"),
            '{' => {
                let mut r = String::from("{");
                loop {
                    match it.next() {
                        Some('}') => break,
                        Some(c) if c.is_ascii_digit() || c == ',' => r.push(c),
                        Some(' ' | '\t') => {}
                        _ => return Err(format!("line {line}: a repetition is `{{m}}`, `{{m,}}`, `{{m,n}}` or `{{,n}}`")),
                    }
                }
                if r == "{" || r == "{," || r.matches(',').count() > 1 {
                    return Err(format!("line {line}: a repetition is `{{m}}`, `{{m,}}`, `{{m,n}}` or `{{,n}}`"));
                }
                Tok::Repeat(r + "}")
            }
            c if is_name_char(c) => {
                let mut name = String::from(c);
                while let Some(c) = it.next_if(|&c| is_name_char(c)) {
                    name.push(c);
                }
                Tok::Name(name)
            }
            c => return Err(format!("line {line}: unexpected {c:?}")),
        };
        out.push((tok, line));
    }
    Ok(out)
}

/// The character an escape (after its `\`) stands for: GBNF's `\n \r \t
/// \\ \" \[ \] \- \xHH \uHHHH \UHHHHHHHH`.
fn escape(it: &mut std::iter::Peekable<std::str::Chars>, line: usize) -> Result<char, String> {
    let hex = |it: &mut std::iter::Peekable<std::str::Chars>, n: usize| -> Result<char, String> {
        let digits: String = (0..n).filter_map(|_| it.next_if(char::is_ascii_hexdigit)).collect();
        let code = u32::from_str_radix(&digits, 16).ok().filter(|_| digits.len() == n);
        code.and_then(char::from_u32).ok_or_else(|| format!("line {line}: a \\x, \\u or \\U escape needs {n} hex digits of a character"))
    };
    match it.next() {
        Some('n') => Ok('\n'),
        Some('r') => Ok('\r'),
        Some('t') => Ok('\t'),
        Some(c @ ('\\' | '"' | '[' | ']' | '-' | '/')) => Ok(c),
        Some('x') => hex(it, 2),
        Some('u') => hex(it, 4),
        Some('U') => hex(it, 8),
        Some(c) => Err(format!("line {line}: unknown escape \\{c}")),
        None => Err(format!("line {line}: the grammar ends in an escape")),
    }
}

/// A GBNF string as Lark literals of one character each, grouped where a
/// repetition follows (`repeated`) so that it takes them all (a sequence
/// binds tighter than `|` without; a group costs one of the 30 levels of
/// nesting Lark allows). `""`, the empty string, as it is. Each in JSON's
/// syntax, where Lark also wants DEL escaped.
fn literal(text: &str, repeated: bool) -> String {
    let one = |c: char| serde_json::to_string(&c.to_string()).expect("a string serializes").replace('\u{7f}', "\\u007f");
    let chars = text.chars().map(one).collect::<Vec<_>>().join(" ");
    match text.chars().count() {
        0 => "\"\"".into(),
        2.. if repeated => format!("({chars})"),
        _ => chars,
    }
}

/// A Lark regular expression of one character of a class; every character
/// but letters and digits written as `\x{..}`, so none is taken for syntax.
fn class_regex(negated: bool, items: &[(char, char)]) -> String {
    let one = |c: char| if c.is_ascii_alphanumeric() { c.to_string() } else { format!("\\x{{{:x}}}", c as u32) };
    let mut out = String::from(if negated { "/[^" } else { "/[" });
    for &(lo, hi) in items {
        out += &one(lo);
        if hi != lo {
            out.push('-');
            out += &one(hi);
        }
    }
    if negated && items.is_empty() {
        // `[^]`: any character.
        return r"/[\x{0}-\x{10FFFF}]/".into();
    }
    out + "]/"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_spelt_for_lark_one_a_line() {
        let g = r#"
            # a comment
            root ::= greeting ws-1 ( "world" | [a-z]{2,5} | "ab"* )
            greeting ::= "hi" | "h\"i\x41"   # another
            ws-1 ::= [ \t\n]+
              | "."?
        "#;
        let want = concat!(
            "start: r0-root\n",
            "r0-root: r1-greeting r2-ws-1 ( \"w\" \"o\" \"r\" \"l\" \"d\" | /[a-z]/ {2,5} | (\"a\" \"b\") * )\n",
            "r1-greeting: \"h\" \"i\" | \"h\" \"\\\"\" \"i\" \"A\"\n",
            "r2-ws-1: /[\\x{20}\\x{9}\\x{a}]/ + | \".\" ?\n",
        );
        assert_eq!(to_lark(g).unwrap(), want);
    }

    #[test]
    fn classes_ranges_and_any_character() {
        let g = "root ::= [^\"\\\\] [a-zA-Z0-9_-] . [\\u00e9-\\U0001F600] [-]";
        let lark = to_lark(g).unwrap();
        let body = lark.lines().nth(1).unwrap();
        assert_eq!(body, r"r0-root: /[^\x{22}\x{5c}]/ /[a-zA-Z0-9\x{5f}\x{2d}]/ /[\x{0}-\x{10FFFF}]/ /[\x{e9}-\x{1f600}]/ /[\x{2d}]/");
    }

    #[test]
    fn mistakes_are_named_with_their_line() {
        let cases = [
            ("", "empty"),
            ("a ::= \"x\"", "no root rule"),
            ("root ::= b", "rule b is used but never defined"),
            ("root ::= \"a\"\nroot ::= \"b\"", "line 2: rule root is defined twice"),
            ("root ::= \"abc", "line 1: a string is not closed"),
            ("root ::= [a-", "not closed"),
            ("root ::= [z-a]", "runs backwards"),
            ("root ::= \"\\q\"", "unknown escape \\q"),
            ("root ::= \"\\x4\"", "2 hex digits"),
            ("root ::= \"a\"{x}", "a repetition is"),
            ("\"a\" root ::= \"b\"", "line 1: expected a rule"),
            ("root ::=\nx ::= \"a\"", "rule root is empty"),
            ("root ::= \"a\" ; ", "unexpected ';'"),
        ];
        for (g, want) in cases {
            let err = to_lark(g).unwrap_err();
            assert!(err.contains(want), "{g:?}: {err}");
        }
    }
}
