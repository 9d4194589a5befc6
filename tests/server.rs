//! `bitnet serve` end to end: the official `openai` Python client against
//! it, greedy output equal to `bitnet run`'s, 32 concurrent streaming
//! clients (some hanging up mid-stream), bad input, and a clean stop on
//! SIGTERM. The clients are tests/server_client.py (needs `pip install
//! openai`, which `.ci/run` does).

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

const KEY: &str = "sk-test-0123";

struct Server {
    child: Child,
    url: String,
    log: Arc<Mutex<String>>,
}

impl Server {
    fn start(args: &[&str]) -> Server {
        let mut child = Command::new(bitnet_bin())
            .args(["serve", "--port", "0", "--api-key", KEY])
            .args(args)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("starting bitnet serve");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("listening on ") {
                    let _ = tx.send(url.to_string());
                }
                l.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let url = rx.recv_timeout(std::time::Duration::from_secs(60)).unwrap_or_else(|_| panic!("the server did not start: {}", log.lock().unwrap()));
        Server { child, url, log }
    }

    fn client(&self, check: &str, extra: &[&str]) {
        let o = Command::new("python3")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/server_client.py"))
            .args([check, &self.url, KEY])
            .args(extra)
            .output()
            .expect("running python3");
        assert!(o.status.success(), "{check}: {}\n{}\nserver log:\n{}", stdout(&o), stderr(&o), self.log.lock().unwrap());
    }

    /// SIGTERM: running requests finish, then the server exits 0.
    fn stop(mut self) {
        let kill = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(kill.success());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "exit {status:?}: {}", self.log.lock().unwrap());
        assert!(self.log.lock().unwrap().contains("stopping"));
    }
}

/// `bitnet run --greedy`'s text for each prompt, as the clients expect it.
fn expected(model: &str, prompts: &[&str]) -> String {
    let mut map = serde_json::Map::new();
    for p in prompts {
        let o = bitnet(&["run", "-m", model, "-p", p, "-n", "20", "--temp", "0", "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let j: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        map.insert(p.to_string(), j["text"].clone());
    }
    serde_json::Value::Object(map).to_string()
}

const PROMPTS: [&str; 5] = [
    "Once upon a time",
    "The little dog",
    "Lily and Tom went to the park. They saw a big",
    "Hi",
    "One day, a girl named Sue found a shiny red ball in the garden. She",
];

#[test]
fn the_openai_client_gets_what_run_gives() {
    let m = stories();
    let m = m.to_str().unwrap();
    let want = expected(m, &PROMPTS[..3]);
    let s = Server::start(&["-m", m, "--chat-template", "llama3", "--parallel", "4", "-t", "2"]);
    s.client("openai", &[&want]);
    s.stop();
}

#[test]
fn many_streaming_clients_get_their_serial_tokens() {
    let m = stories();
    let m = m.to_str().unwrap();
    let want = expected(m, &PROMPTS);
    // A small step budget: the longer prompts go in by chunks while others decode.
    let s = Server::start(&["-m", m, "--parallel", "8", "-t", "2", "--step-tokens", "16"]);
    s.client("load", &[&want]);
    s.client("bad", &[]);
    bench_serve_reports_what_it_drove(&s);
    s.stop();
}

/// scripts/bench_serve.py against the server: every request completes and
/// generates exactly `-n` tokens (`ignore_eos`), and the figures are there.
fn bench_serve_reports_what_it_drove(s: &Server) {
    let o = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bench_serve.py"))
        .args([&s.url, "--api-key", KEY, "-c", "1,3", "-r", "2", "-p", "40", "-n", "9", "--json"])
        .output()
        .expect("running python3");
    assert!(o.status.success(), "bench_serve: {}\n{}", stdout(&o), stderr(&o));
    let rows: Vec<serde_json::Value> = stdout(&o).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 2);
    for (row, clients) in rows.iter().zip([1, 3]) {
        assert_eq!(row["clients"], clients);
        assert_eq!(row["completed"], clients * 2, "{row}");
        assert_eq!(row["failed"], 0);
        assert_eq!(row["generated_tokens"], clients * 2 * 9, "{row}");
        assert!(row["aggregate_tok_s"].as_f64().unwrap() > 0.0 && row["ttft_ms_p50"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["itl_ms_p99"].as_f64().unwrap() >= row["itl_ms_p50"].as_f64().unwrap(), "{row}");
    }
    // Three choices a request: three times the tokens.
    let o = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bench_serve.py"))
        .args([&s.url, "--api-key", KEY, "-c", "2", "-r", "1", "-p", "40", "-n", "5", "--choices", "3", "--json"])
        .output()
        .expect("running python3");
    assert!(o.status.success(), "bench_serve --choices: {}\n{}", stdout(&o), stderr(&o));
    let row: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!((row["completed"].as_u64(), row["generated_tokens"].as_u64(), row["choices"].as_u64()), (Some(2), Some(2 * 3 * 5), Some(3)), "{row}");
}

/// schemathesis generates requests from `/openapi.json` (valid ones and
/// broken ones) for a bounded time: no 5xx, every status documented,
/// every response (streamed events included) as the spec says.
#[test]
fn schemathesis_finds_the_server_as_its_spec_says() {
    if !have_command("st", "pip install schemathesis") {
        return;
    }
    let m = stories();
    let s = Server::start(&["-m", m.to_str().unwrap(), "--chat-template", "chatml", "--parallel", "4", "-t", "2"]);
    let checks = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance";
    let cache = tmp_dir("schemathesis");
    let o = Command::new("st")
        .args(["run", &format!("{}/openapi.json", s.url), "--seed", "1", "-n", "10", "--max-time", "60", "--request-timeout", "30", "-c", checks])
        .args(["-H", &format!("Authorization: Bearer {KEY}")])
        .env("NO_COLOR", "1")
        // Its cache of found crashes goes to the working directory.
        .current_dir(&cache)
        .output()
        .expect("running schemathesis");
    assert!(o.status.success(), "schemathesis found failures:\n{}\n{}", stdout(&o), stderr(&o));
    s.stop();
}

/// The chat page in a real headless Chromium, driven by playwright-core
/// (tests/browser/chat_page.mjs; `npm ci --prefix tests/browser` and
/// Debian's `chromium`): a prompt's answer streams in and equals the
/// API's; the Stop button stops a long answer and the server cancels it.
#[test]
fn the_chat_page_streams_and_stops_in_a_real_browser() {
    let browser_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser");
    if !have_command("node", "Node.js") || !have_command("chromium", "apt-get install chromium") {
        return;
    }
    if !std::path::Path::new(browser_dir).join("node_modules/playwright-core").exists() {
        assert!(std::env::var_os("BITNET_REQUIRE_TOOLS").is_none(), "playwright-core is not installed (npm ci --prefix tests/browser)");
        eprintln!("skipped: playwright-core is not installed (npm ci --prefix tests/browser)");
        return;
    }
    // A small synthetic model with a long context: a long answer takes
    // long enough to be stopped.
    let dir = tmp_dir("browser");
    let model = dir.join("tiny.gguf");
    let o = bitnet(&["synth", "--shape", "tiny", "-o", model.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = Server::start(&["-m", model.to_str().unwrap(), "--chat-template", "chatml", "-t", "2"]);
    let o = Command::new("node").current_dir(browser_dir).args(["chat_page.mjs", &s.url, KEY]).output().expect("running node");
    assert!(o.status.success(), "the chat page test failed:\n{}\n{}\nserver log:\n{}", stdout(&o), stderr(&o), s.log.lock().unwrap());
    s.stop();
    let _ = std::fs::remove_dir_all(dir);
}
