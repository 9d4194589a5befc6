"""The Python bindings against the CLI, on stories260K (testdata/).

BITNET_BIN names the `bitnet` CLI to compare with (default: the repository's
target/release or target/debug build); BITNET_DATA the shared data folder.
"""

import json
import os
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest

import bitnet

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("BITNET_DATA", ROOT / "testdata"))
STORIES = DATA / "models" / "stories260K" / "stories260K.gguf"
PROMPT_IDS = [1, 403, 407, 261, 378]
# testdata/README.md: stories260K's greedy continuation of PROMPT_IDS.
KNOWN = [432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 410, 408, 419, 292]


def cli():
    if os.environ.get("BITNET_BIN"):
        return os.environ["BITNET_BIN"]
    for profile in ("release", "debug"):
        p = ROOT / "target" / profile / "bitnet"
        if p.exists():
            return str(p)
    pytest.skip("no bitnet CLI built (cargo build), and BITNET_BIN is not set")


def run_cli(*args):
    out = subprocess.run([cli(), *args], capture_output=True, text=True, check=True)
    return out.stdout


@pytest.fixture(scope="module")
def model():
    with bitnet.Model(STORIES, threads=2, parallel=8) as m:
        yield m


def test_greedy_ids_are_the_known_continuation(model):
    assert model.generate_ids(PROMPT_IDS, max_tokens=20, temperature=0) == KNOWN


def test_generate_gives_the_cli_text(model):
    want = json.loads(run_cli("run", "-m", str(STORIES), "-p", "Once upon a time", "-n", "20", "--temp", "0", "-t", "2", "--json"))
    assert model.generate("Once upon a time", max_tokens=20, temperature=0) == want["text"]
    assert model.tokenize("Once upon a time") == want["prompt_ids"]
    assert model.detokenize(want["prompt_ids"]).strip() == "Once upon a time"


def test_stream_pieces_join_to_the_text(model):
    whole = model.generate("Lily and Tom", max_tokens=30, temperature=0)
    pieces = list(model.stream("Lily and Tom", max_tokens=30, temperature=0))
    assert len(pieces) > 3
    assert "".join(pieces) == whole


def test_stop_strings_end_the_text_before_them(model):
    whole = model.generate("Once upon a time", max_tokens=20, temperature=0)
    stop = whole.split()[3]
    cut = model.generate("Once upon a time", max_tokens=20, temperature=0, stop=[stop])
    assert cut == whole[: whole.index(stop)]
    assert "".join(model.stream("Once upon a time", max_tokens=20, temperature=0, stop=[stop])) == cut


def test_logits_equal_the_cli_dump_bit_for_bit(model):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "logits.npy"
        run_cli("run", "-m", str(STORIES), "--prompt-ids", ",".join(map(str, PROMPT_IDS)), "-n", "1", "--temp", "0", "-t", "2", "--dump-logits", str(path))
        want = np.load(path)
    got = model.logits(PROMPT_IDS)
    assert got.dtype == np.float32 and got.shape == (len(PROMPT_IDS), model.n_vocab)
    assert np.array_equal(got, want[: len(PROMPT_IDS)])
    assert int(got[-1].argmax()) == KNOWN[0]


def test_eight_threads_get_their_serial_outputs(model):
    prompts = [[1, 403 + i, 407, 261, 378] for i in range(8)]
    serial = [model.generate_ids(p, max_tokens=16, temperature=0) for p in prompts]
    results = [None] * 8

    def work(i):
        results[i] = model.generate_ids(prompts[i], max_tokens=16, temperature=0)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == serial


def test_sampling_is_seeded(model):
    a = model.generate("Once", max_tokens=16, temperature=1.0, seed=7)
    b = model.generate("Once", max_tokens=16, temperature=1.0, seed=7)
    assert a == b


def test_logit_bias_forces_and_bans_tokens(model):
    prompt = [1, 403, 407, 261, 378]
    assert model.generate_ids(prompt, max_tokens=5, temperature=0, logit_bias={300: 100.0}) == [300] * 5
    first = model.generate_ids(prompt, max_tokens=1, temperature=0)[0]
    banned = model.generate_ids(prompt, max_tokens=16, temperature=2.0, top_k=0, min_p=0.0, seed=1, logit_bias={first: float("-inf")})
    assert first not in banned
    assert "ha ha" in model.generate("Once", max_tokens=4, temperature=0, logit_bias={300: 100})
    with pytest.raises(bitnet.InvalidArgumentError, match="token id 512 is outside the vocabulary"):
        model.generate_ids(prompt, max_tokens=2, logit_bias={512: 1.0})
    with pytest.raises(bitnet.InvalidArgumentError, match="logit_bias = NaN"):
        model.generate("Once", max_tokens=2, logit_bias={3: float("nan")})


def test_response_format_holds_the_output_to_a_schema(model):
    card = {
        "type": "object",
        "properties": {"mood": {"enum": ["happy", "sad"]}, "age": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["mood", "age"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "card", "schema": card}}
    for seed in range(3):
        doc = json.loads(model.generate("Once", max_tokens=64, temperature=1.0, seed=seed, response_format=fmt))
        assert doc["mood"] in ("happy", "sad") and 1 <= doc["age"] <= 9 and len(doc) == 2, doc
    assert json.loads("".join(model.stream("Once", max_tokens=64, response_format=fmt)))["mood"] in ("happy", "sad")
    assert model.generate("Once", max_tokens=4, temperature=0, response_format={"type": "text"}) == model.generate("Once", max_tokens=4, temperature=0)
    with pytest.raises(bitnet.InvalidArgumentError, match="unknown response format type"):
        model.generate("Once", response_format={"type": "yaml"})
    with pytest.raises(bitnet.InvalidArgumentError, match="the JSON schema does not compile"):
        model.generate("Once", response_format={"type": "json_schema", "json_schema": {"schema": {"type": "bogus"}}})


def test_grammar_holds_the_output_to_a_gbnf_grammar(model):
    gbnf = 'root ::= ("yes" | "no") "!"{1,3}'
    for seed in range(3):
        text = model.generate("Once", max_tokens=16, temperature=1.0, seed=seed, grammar=gbnf)
        assert text.rstrip("!") in ("yes", "no") and 1 <= text.count("!") <= 3, text
    assert "".join(model.stream("Once", max_tokens=16, seed=1, grammar=gbnf)).rstrip("!") in ("yes", "no")
    with bitnet.Model(STORIES, threads=2, chat_template="chatml") as m:
        assert m.chat([{"role": "user", "content": "Hi"}], max_tokens=16, grammar='root ::= [A-Z] [a-z]{2,4} "."').endswith(".")
    with pytest.raises(bitnet.InvalidArgumentError, match="rule thing is used but never defined"):
        model.generate("Once", grammar="root ::= thing")
    with pytest.raises(bitnet.InvalidArgumentError, match="not both"):
        model.generate("Once", grammar=gbnf, response_format={"type": "json_object"})


def test_info_describes_the_model(model):
    info = model.info
    assert info["architecture"] == "llama"
    assert info["vocab"] == model.n_vocab == 512
    assert info["layers"] > 0 and info["context"] == model.n_ctx
    assert sum(info["tensor_types"].values()) > 0


def test_a_family_loads_by_its_layout_and_chats_with_its_template(tmp_path):
    folder = tmp_path / "falcon3-tiny"
    run_cli("synth", "--family", "falcon3-1b", "--format", "hf", "-o", str(folder))
    with bitnet.Model(str(folder), threads=2) as m:
        info = m.info
        assert (info["family"], info["bitlinear"], info["sub_norms"], info["head_dim"]) == ("falcon3-1b", True, False, 256)
        assert isinstance(m.chat([{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0), str)
    with bitnet.Model(STORIES, threads=2) as m:
        assert m.info["family"] is None and not m.info["bitlinear"]


def test_chat_needs_a_template_and_uses_one():
    with bitnet.Model(STORIES, threads=2) as m:
        with pytest.raises(bitnet.InvalidArgumentError, match="chat template"):
            m.chat([{"role": "user", "content": "Hi"}], max_tokens=4)
    with bitnet.Model(STORIES, threads=2, chat_template="chatml") as m:
        assert isinstance(m.chat([{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0), str)
        with pytest.raises(bitnet.InvalidArgumentError, match="role"):
            m.chat([{"role": "robot", "content": "Hi"}])


@pytest.mark.parametrize("content", [b"", b"GGUF", b"GGUF\x03\x00\x00\x00" + b"\xff" * 64, b"not a model at all" * 10])
def test_bad_files_raise_model_load_error(content):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "bad.gguf"
        path.write_bytes(content)
        with pytest.raises(bitnet.ModelLoadError, match="bad.gguf"):
            bitnet.Model(path)


def test_a_truncated_model_raises_model_load_error():
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "cut.gguf"
        path.write_bytes(STORIES.read_bytes()[: STORIES.stat().st_size // 2])
        with pytest.raises(bitnet.ModelLoadError):
            bitnet.Model(path)


def test_missing_file_and_bad_arguments(model):
    with pytest.raises(bitnet.ModelLoadError, match="no-such"):
        bitnet.Model("/no-such/model.gguf")
    with pytest.raises(bitnet.InvalidArgumentError):
        bitnet.Model(STORIES, device="tpu")
    with pytest.raises(bitnet.InvalidArgumentError):
        model.generate("x", temperature=-1)
    with pytest.raises(bitnet.InvalidArgumentError, match=r"min_p = 1.5 is out of range: it must be in \[0, 1\]"):
        model.generate("x", min_p=1.5)
    with pytest.raises(bitnet.InvalidArgumentError):
        model.generate_ids([])
    with pytest.raises(bitnet.InvalidArgumentError, match="vocabulary"):
        model.generate_ids([1, 99999])
    with pytest.raises(bitnet.ContextFullError):
        model.generate_ids([1] * (model.n_ctx + 5))
    assert issubclass(bitnet.ContextFullError, bitnet.BitnetError)


def test_closed_model_raises():
    m = bitnet.Model(STORIES, threads=1)
    m.close()
    with pytest.raises(bitnet.BitnetError, match="closed"):
        m.generate("x")


def test_compile_writes_an_artifact_that_runs():
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "stories.bnx"
        report = bitnet.compile(STORIES, out, threads=2)
        assert out.exists() and report["bytes"] == out.stat().st_size
        with bitnet.Model(out, threads=2) as m:
            assert m.generate_ids(PROMPT_IDS, max_tokens=20, temperature=0) == KNOWN


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small synthetic model with a 4096-token context: long generations."""
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    run_cli("synth", "--shape", "tiny", "-o", str(path))
    return path


@pytest.fixture
def sigint_raises():
    """SIGINT raising KeyboardInterrupt, as in a terminal. A process started
    in the background by a shell without job control inherits SIGINT
    ignored, Python then leaves it so, and `_thread.interrupt_main` does
    nothing at all."""
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_ctrl_c_stops_a_long_generation(tiny, sigint_raises):
    import _thread
    import time

    with bitnet.Model(tiny, threads=2) as m:
        timer = threading.Timer(0.3, _thread.interrupt_main)
        t0 = time.monotonic()
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            m.generate("Hello", max_tokens=4000, ignore_eos=True)
        assert time.monotonic() - t0 < 5
        # The model is still usable, and the interrupted sequence's cache
        # is free again (a generation that needs the whole budget fits).
        assert len(m.generate_ids([1, 2, 3], max_tokens=8, temperature=0, ignore_eos=True)) == 8


def test_breaking_out_of_a_stream_ends_it(tiny):
    with bitnet.Model(tiny, threads=2, context=256, parallel=1) as m:
        for i, _ in enumerate(m.stream("Hello", max_tokens=200, ignore_eos=True)):
            if i == 3:
                break
        # parallel=1: the budget holds one full context, so a prompt of
        # nearly the whole context fits only once the abandoned stream's
        # sequence has been freed.
        assert len(m.generate_ids([1] * 250, max_tokens=2, temperature=0, ignore_eos=True)) == 2
        held = m.stream("Hello", max_tokens=200, ignore_eos=True)
        next(held)
        with pytest.raises(bitnet.ContextFullError):
            m.generate_ids([1] * 250, max_tokens=2, temperature=0, ignore_eos=True)
        held.close()
        assert len(m.generate_ids([1] * 250, max_tokens=2, temperature=0, ignore_eos=True)) == 2


def test_the_1_6_bit_packing_is_lossless(tiny):
    ids = [1, 403, 407, 261, 378]
    with bitnet.Model(tiny, threads=2, packing="2bit") as m:
        two = m.logits(ids)
    with bitnet.Model(tiny, threads=2, packing="1.6bit") as m:
        assert np.array_equal(m.logits(ids), two)
    with pytest.raises(bitnet.InvalidArgumentError, match="1.6bit"):
        bitnet.Model(tiny, packing="1bit")
    with pytest.raises(bitnet.InvalidArgumentError, match=r'unknown ISA "sse": one of scalar, avx2, avx512vnni, cranelift'):
        bitnet.Model(tiny, isa="sse")


def test_quantized_heads_stay_close_to_the_stored_one():
    ids = [1, 403, 407, 261, 378]
    with bitnet.Model(STORIES, threads=2) as m:
        stored = m.logits(ids)
    for head in ("q8", "q4"):
        with bitnet.Model(STORIES, threads=2, head=head) as m:
            got = m.logits(ids)
        cos = (got * stored).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(stored, axis=1))
        assert cos.min() > 0.99 and not np.array_equal(got, stored), (head, cos)
    with pytest.raises(bitnet.InvalidArgumentError, match="q4"):
        bitnet.Model(STORIES, head="q5")


def test_an_f16_cache_stays_close_to_the_f32_one():
    ids = [1, 403, 407, 261, 378]
    with bitnet.Model(STORIES, threads=2) as m:
        f32 = m.logits(ids)
    with bitnet.Model(STORIES, threads=2, cache_type="f16") as m:
        f16 = m.logits(ids)
    assert np.abs(f16 - f32).max() < 0.05 and not np.array_equal(f16, f32)
    with pytest.raises(bitnet.InvalidArgumentError, match="f16"):
        bitnet.Model(STORIES, cache_type="q8")
