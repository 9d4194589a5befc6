//! Choices a user names by one word (a packing, a head, a cache type):
//! one lookup and one error for all of them.

/// The one of `all` whose `name` is `s`, or an error that names `what` was
/// asked for and lists the names it could have been.
pub fn parse_name<T: Copy>(what: &str, s: &str, all: &[T], name: fn(T) -> &'static str) -> Result<T, String> {
    all.iter().copied().find(|&t| name(t) == s).ok_or_else(|| {
        let names: Vec<&str> = all.iter().map(|&t| name(t)).collect();
        format!("unknown {what} {s:?}: one of {}", names.join(", "))
    })
}

#[cfg(test)]
mod tests {
    use super::parse_name;

    #[test]
    fn a_name_is_found_and_a_wrong_one_lists_the_names() {
        let name = |b: bool| if b { "yes" } else { "no" };
        assert_eq!(parse_name("answer", "no", &[true, false], name), Ok(false));
        assert_eq!(parse_name("answer", "maybe", &[true, false], name), Err("unknown answer \"maybe\": one of yes, no".to_string()));
    }
}
