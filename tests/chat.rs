//! `bitnet chat` and `run --chat` on a synthetic model with a chat template.

mod common;
use bitnet_frontends::arch::Activation;
use bitnet_ir::DType;
use common::*;
use std::io::Write;
use std::process::{Command, Stdio};

#[test]
fn chat_takes_turns_until_end_of_input() {
    let dir = tmp_dir("chat");
    let model = dir.join("m.gguf");
    write_synth(&small_spec(DType::I2S, Activation::Relu2), &model);
    let mut child = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(["chat", "-m", model.to_str().unwrap(), "-n", "3", "--greedy", "--system", "Be brief.", "--verbose"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"Hello\n\nHow are you?\n").unwrap();
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    // Two replies, each with its own timing line; the second turn reuses
    // the cached conversation, so its prompt is shorter than the whole.
    let prompts: Vec<usize> = err.lines().filter_map(|l| l.split("prompt ").nth(1)?.split(' ').next()?.parse().ok()).collect();
    assert_eq!(prompts.len(), 2, "{err}");
    assert!(prompts[1] < prompts[0], "second turn evaluated {} tokens: {err}", prompts[1]);
}

#[test]
fn run_chat_parses_template_special_tokens() {
    let dir = tmp_dir("run-chat");
    let model = dir.join("m.gguf");
    write_synth(&small_spec(DType::TQ2_0, Activation::Silu), &model);
    let o = bitnet(&["run", "-m", model.to_str().unwrap(), "-p", "Hi", "--chat", "-n", "1", "--greedy", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let ids: Vec<u64> = v["prompt_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
    // <|begin_of_text|> once, then <|start_header_id|> as one token.
    assert_eq!(&ids[..2], &[256, 258], "{ids:?}");
    assert_eq!(ids.iter().filter(|&&i| i == 256).count(), 1, "BOS must not be doubled");
    // Without --chat the same text is plain bytes.
    let o = bitnet(&["run", "-m", model.to_str().unwrap(), "-p", "<|eot_id|>", "-n", "1", "--greedy", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["prompt_ids"].as_array().unwrap().len(), 1 + "<|eot_id|>".len());
}
