//! Chat templates: the model's `tokenizer.chat_template` (Jinja, as
//! Hugging Face writes them) rendered with minijinja, with the Python
//! string methods templates expect (`.strip()`, `.startswith()`, ...).

use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message { role: role.into(), content: content.into() }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("chat template: {0}")]
pub struct ChatError(pub String);

/// A template used when the model file has none: LLaMA-3's format.
pub const LLAMA3_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}";

/// ChatML (`<|im_start|>role ... <|im_end|>`), as Qwen and many fine-tunes use it.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// BitNet b1.58 2B4T's turns (`Role: text<|eot_id|>`, as llama.cpp's
/// `bitnet` chat format writes them), after BOS.
pub const BITNET_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}";

/// microsoft/bitnet-b1.58-2B-4T's `tokenizer_config.json` template
/// (`Role: text<|eot_id|>`, no BOS in the template: the tokenizer adds it).
pub const BITNET_2B4T_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = message['role'] | capitalize + ': '+ message['content'] | trim + '<|eot_id|>' %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}";

/// HF1BitLLM/Llama3-8B-1.58-100B-tokens' template: LLaMA-3 headers, BOS
/// before the first message (docs/model-families.md: its middle is the
/// standard LLaMA-3 text, inferred from a cut log).
pub const LLAMA3_8B_158_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// Falcon3 Instruct's template without its tool-calling branch:
/// `<|role|>\ntext\n` turns, assistant turns closed by EOS.
pub const FALCON3_TEMPLATE: &str = "{%- for message in messages %}
{%- if message['role'] == 'system' %}
{{- '<|system|>\n' + message['content'] + '\n' }}
{%- elif message['role'] == 'user' %}
{{- '<|user|>\n' + message['content'] + '\n' }}
{%- elif message['role'] == 'assistant' %}
{%- if not loop.last %}
{{- '<|assistant|>\n' + message['content'] + eos_token + '\n' }}
{%- else %}
{{- '<|assistant|>\n' + message['content'] + eos_token }}
{%- endif %}
{%- endif %}
{%- if loop.last and add_generation_prompt %}
{{- '<|assistant|>\n' }}
{%- endif %}
{%- endfor %}";

/// The built-in templates `--chat-template` names.
pub const BUILTIN_TEMPLATES: [(&str, &str); 6] = [
    ("chatml", CHATML_TEMPLATE),
    ("llama3", LLAMA3_TEMPLATE),
    ("bitnet", BITNET_TEMPLATE),
    ("bitnet-2b4t", BITNET_2B4T_TEMPLATE),
    ("llama3-8b-1.58", LLAMA3_8B_158_TEMPLATE),
    ("falcon3", FALCON3_TEMPLATE),
];

/// A built-in template by name, or the text of a Jinja file.
pub fn template_named(name_or_file: &str) -> Result<String, ChatError> {
    if let Some((_, t)) = BUILTIN_TEMPLATES.iter().find(|(n, _)| *n == name_or_file) {
        return Ok(t.to_string());
    }
    std::fs::read_to_string(name_or_file).map_err(|e| {
        let names: Vec<&str> = BUILTIN_TEMPLATES.iter().map(|(n, _)| *n).collect();
        ChatError(format!("{name_or_file:?} is neither a built-in template ({}) nor a readable file: {e}", names.join(", ")))
    })
}

/// Template instructions one rendering may run: real chat templates use a
/// few thousand per message; a template that loops without end (or
/// nests loops over `range`) runs out of fuel and stops with an error.
pub const FUEL_PER_RENDER: u64 = 1_000_000;

/// The most bytes a rendering may produce for `messages`: generous for
/// any real template (each message's text a few times over, plus the
/// template's own text), finite for a hostile one.
pub fn output_limit(messages: &[Message]) -> usize {
    (1 << 20) + 4 * messages.iter().map(|m| m.role.len() + m.content.len()).sum::<usize>()
}

/// An `io::Write` that refuses to hold more than `limit` bytes.
struct Bounded {
    text: Vec<u8>,
    limit: usize,
    full: bool,
}

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.text.len() + buf.len() > self.limit {
            self.full = true;
            return Err(std::io::Error::other("output limit"));
        }
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Renders `messages`; `add_generation_prompt` opens the assistant's turn.
/// Bounded: at most [`FUEL_PER_RENDER`] template instructions and
/// [`output_limit`] bytes, else an error.
pub fn render(template: &str, messages: &[Message], add_generation_prompt: bool, bos_token: &str, eos_token: &str) -> Result<String, ChatError> {
    let mut env = minijinja::Environment::new();
    env.set_fuel(Some(FUEL_PER_RENDER));
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |_fmt: String| -> String { String::new() });
    env.add_template("chat", template).map_err(|e| ChatError(e.to_string()))?;
    let tmpl = env.get_template("chat").map_err(|e| ChatError(e.to_string()))?;
    let mut out = Bounded { text: Vec::new(), limit: output_limit(messages), full: false };
    let ctx = minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    };
    if let Err(e) = tmpl.render_captured_to(ctx, &mut out) {
        return Err(ChatError(if out.full { format!("the rendered prompt is over {} bytes", out.limit) } else { e.to_string() }));
    }
    String::from_utf8(out.text).map_err(|e| ChatError(format!("the template rendered invalid UTF-8: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_templates_render_and_unknown_names_say_so() {
        let msgs = [Message::new("system", "Be brief."), Message::new("user", " Hi ")];
        let b = render(&template_named("bitnet").unwrap(), &msgs, true, "<s>", "</s>").unwrap();
        assert_eq!(b, "<s>System: Be brief.<|eot_id|>User: Hi<|eot_id|>Assistant: ");
        let c = render(&template_named("chatml").unwrap(), &msgs[1..], true, "", "").unwrap();
        assert_eq!(c, "<|im_start|>user\n Hi <|im_end|>\n<|im_start|>assistant\n");
        let e = template_named("nope").unwrap_err().to_string();
        assert!(e.contains("chatml, llama3, bitnet, bitnet-2b4t, llama3-8b-1.58, falcon3"), "{e}");
    }

    /// A two-turn conversation, as each instruct family's own template
    /// source writes it (expected strings written from the sources quoted
    /// in docs/model-families.md).
    #[test]
    fn family_templates_render_two_turns_as_their_sources_do() {
        let msgs = [Message::new("system", "Be brief."), Message::new("user", "Hi there "), Message::new("assistant", "Hello."), Message::new("user", "Bye")];
        let b = render(BITNET_2B4T_TEMPLATE, &msgs, true, "<|begin_of_text|>", "<|end_of_text|>").unwrap();
        assert_eq!(b, "System: Be brief.<|eot_id|>User: Hi there<|eot_id|>Assistant: Hello.<|eot_id|>User: Bye<|eot_id|>Assistant: ");
        let l = render(LLAMA3_8B_158_TEMPLATE, &msgs, true, "<|begin_of_text|>", "<|eot_id|>").unwrap();
        assert_eq!(
            l,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        let f = render(FALCON3_TEMPLATE, &msgs, true, "", "<|endoftext|>").unwrap();
        assert_eq!(f, "<|system|>\nBe brief.\n<|user|>\nHi there \n<|assistant|>\nHello.<|endoftext|>\n<|user|>\nBye\n<|assistant|>\n");
        // Without the generation prompt, a conversation ending with the
        // assistant ends with EOS and no newline.
        let f = render(FALCON3_TEMPLATE, &msgs[..3], false, "", "<|endoftext|>").unwrap();
        assert_eq!(f, "<|system|>\nBe brief.\n<|user|>\nHi there \n<|assistant|>\nHello.<|endoftext|>");
    }

    #[test]
    fn llama3_template_renders_turns() {
        let msgs = [Message::new("system", "Be brief."), Message::new("user", " Hi ")];
        let s = render(LLAMA3_TEMPLATE, &msgs, true, "<|begin_of_text|>", "<|end_of_text|>").unwrap();
        assert_eq!(
            s,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn endless_and_huge_templates_stop_with_an_error() {
        let msgs = [Message::new("user", "hi")];
        let loops = "{% for a in range(100000) %}{% for b in range(100000) %}{{ a }}{% endfor %}{% endfor %}";
        let e = render(loops, &msgs, true, "", "").unwrap_err();
        assert!(e.0.contains("fuel"), "{e}");
        let big = "{% for a in range(9000) %}{{ 'x' * 1000 }}{% endfor %}";
        let e = render(big, &msgs, true, "", "").unwrap_err();
        assert!(e.0.contains("over"), "{e}");
        let fits = "{% for a in range(900) %}{{ 'x' * 1000 }}{% endfor %}";
        assert_eq!(render(fits, &msgs, true, "", "").unwrap().len(), 900_000);
    }

    #[test]
    fn python_methods_and_exceptions_work() {
        let t = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0]['content'].strip().upper() }}";
        assert_eq!(render(t, &[Message::new("user", " hey ")], false, "", "").unwrap(), "HEY");
        let e = render(t, &[Message::new("system", "x")], false, "", "").unwrap_err();
        assert!(e.0.contains("first must be user"), "{e}");
    }
}
