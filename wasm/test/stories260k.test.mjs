// The WebAssembly build on stories260K, in Node.js: `scripts/wasm.sh` builds
// the package (target/wasm/pkg) and runs this file with `node --test`.
// BITNET_WASM_PKG names another package folder; BITNET_BIN the `bitnet` CLI
// to compare with (default: the repository's target/{release,debug}/bitnet).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const pkg = process.env.BITNET_WASM_PKG ?? path.join(root, 'target/wasm/pkg');
const { Bitnet, BitnetError } = await import(path.join(pkg, 'bitnet.mjs'));
const STORIES = path.join(root, 'testdata/models/stories260K/stories260K.gguf');
const PROMPT_IDS = [1, 403, 407, 261, 378];
// testdata/README.md: stories260K's greedy continuation of PROMPT_IDS.
const KNOWN = [432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 410, 408, 419, 292];

const bitnet = await Bitnet.instantiate();
const model = bitnet.loadModel(readFileSync(STORIES), { parallel: 2 });
const greedy = { maxTokens: 20, temperature: 0 };

function cli() {
  if (process.env.BITNET_BIN) return process.env.BITNET_BIN;
  return ['release', 'debug'].map((p) => path.join(root, 'target', p, 'bitnet')).find(existsSync);
}

test('greedy ids from the prompt ids are the known continuation', () => {
  assert.deepEqual(model.generateIds(PROMPT_IDS, greedy), KNOWN);
});

test('text, tokens and the finish reason match the CLI', (t) => {
  const bin = cli();
  if (!bin) return t.skip('no bitnet CLI built (cargo build), and BITNET_BIN is not set');
  const want = JSON.parse(execFileSync(bin, ['run', '-m', STORIES, '-p', 'Once upon a time', '-n', '20', '--temp', '0', '-t', '1', '--json'], { encoding: 'utf8' }));
  assert.equal(model.generate('Once upon a time', greedy), want.text);
  assert.deepEqual(model.tokenize('Once upon a time'), want.prompt_ids);
  assert.deepEqual(want.prompt_ids, PROMPT_IDS);
  const done = model.complete({ prompt: 'Once upon a time', ...greedy });
  assert.deepEqual(done.ids, KNOWN);
  assert.equal(done.finish_reason, 'length');
  assert.deepEqual(done.usage, { prompt_tokens: 5, completion_tokens: 20, total_tokens: 25 });
});

test('logit biases and a response format, in camelCase', () => {
  assert.deepEqual(model.generateIds(PROMPT_IDS, { ...greedy, maxTokens: 3, logitBias: { 300: 100 } }), [300, 300, 300]);
  const schema = { type: 'object', properties: { ok: { type: 'boolean' } }, required: ['ok'], additionalProperties: false };
  const done = model.complete({ prompt: 'Once', maxTokens: 40, seed: 2, responseFormat: { type: 'json_schema', json_schema: { schema } } });
  assert.equal(typeof JSON.parse(done.text).ok, 'boolean');
  assert.equal(done.finish_reason, 'stop');
  assert.throws(() => model.generate('Once', { responseFormat: { type: 'yaml' } }), /unknown response format type/);
  const answer = model.generate('Once', { maxTokens: 10, seed: 3, grammar: 'root ::= ("yes" | "no") "!"' });
  assert.ok(answer === 'yes!' || answer === 'no!', answer);
  assert.throws(() => model.generate('Once', { grammar: 'root ::= maybe' }), /rule maybe is used but never defined/);
});

test('streamed pieces add up to the text, and stop strings cut it', () => {
  const whole = model.generate('Lily and Tom', { maxTokens: 30, temperature: 0 });
  const pieces = [...model.stream('Lily and Tom', { maxTokens: 30, temperature: 0 })];
  assert.ok(pieces.length > 3, `only ${pieces.length} pieces`);
  assert.equal(pieces.join(''), whole);
  const stop = whole.split(' ')[4];
  const cut = model.generate('Lily and Tom', { maxTokens: 30, temperature: 0, stop });
  assert.equal(cut, whole.slice(0, whole.indexOf(stop)));
  assert.equal([...model.stream('Lily and Tom', { maxTokens: 30, temperature: 0, stop: [stop] })].join(''), cut);
});

test('two streams at once each get their serial text', () => {
  const a = model.generate('Once upon a time', greedy);
  const b = model.generate('The cat', greedy);
  const [sa, sb] = [model.stream('Once upon a time', greedy), model.stream('The cat', greedy)];
  let [ta, tb] = ['', ''];
  for (;;) {
    const [na, nb] = [sa.next(), sb.next()];
    if (!na.done) ta += na.value;
    if (!nb.done) tb += nb.value;
    if (na.done && nb.done) break;
  }
  assert.equal(ta, a);
  assert.equal(tb, b);
});

test('a stream left early frees its cache for the next', () => {
  for (let i = 0; i < 5; i++) {
    for (const piece of model.stream('Once upon a time', greedy)) {
      assert.equal(typeof piece, 'string');
      break;
    }
  }
  assert.deepEqual(model.generateIds(PROMPT_IDS, greedy), KNOWN);
});

test('sampling with a seed repeats', () => {
  const opts = { maxTokens: 15, temperature: 0.9, seed: 42 };
  assert.equal(model.generate('Once upon a time', opts), model.generate('Once upon a time', opts));
});

test('chat needs a template, and uses a built-in one', () => {
  const messages = [{ role: 'user', content: 'Tell me a story.' }];
  assert.throws(() => model.chat(messages, greedy), (e) => e instanceof BitnetError && /chat template/.test(e.message));
  const chatty = bitnet.loadModel(readFileSync(STORIES), { chatTemplate: 'chatml' });
  try {
    assert.equal(typeof chatty.chat(messages, greedy), 'string');
    assert.deepEqual(chatty.tokenize('<|im_start|>', { addBos: false, special: true }), chatty.tokenize('<|im_start|>', { addBos: false }));
  } finally {
    chatty.close();
  }
});

test('info describes the model', () => {
  const info = model.info;
  assert.equal(info.architecture, 'llama');
  assert.equal(info.vocab, 512);
  assert.equal(info.hidden, 64);
  assert.equal(info.backend, 'interp');
});

test('bad files, requests and handles are errors, not crashes', () => {
  const bytes = readFileSync(STORIES);
  const bad = [
    ['garbage', new TextEncoder().encode('not a model at all'), /magic/],
    ['empty', new Uint8Array(0), /shorter than|magic/],
    ['truncated', bytes.subarray(0, bytes.length >> 1), /./],
  ];
  for (const [what, b, re] of bad) {
    assert.throws(() => bitnet.loadModel(b), (e) => e instanceof BitnetError && /loading the model/.test(e.message) && re.test(e.message), what);
  }
  assert.throws(() => bitnet.loadModel(bytes, { contxt: 8 }), /unknown field `contxt`/);
  assert.throws(() => model.generate('x', { maxTokns: 3 }), /unknown field `max_tokns`/);
  assert.throws(() => model.generate('x', { temperature: -1 }), /temperature = -1 is out of range/);
  assert.throws(() => model.generateIds([1, 100000], greedy), /outside the vocabulary/);
  assert.throws(() => model.generateIds([], greedy), /empty/);
  assert.throws(() => model.complete({ prompt: 'a', promptIds: [1] }), /exactly one of/);
  assert.throws(() => model.detokenize([1, 1e6]), /outside the vocabulary/);
  const small = bitnet.loadModel(bytes, { context: 8 });
  assert.throws(() => small.generate('Once upon a time there was a little girl named Lily', greedy), /context/);
  // The context ends it: 8 positions hold the prompt and 3 tokens, and the
  // 4th is sampled from the last one's logits without needing a position.
  const ended = small.complete({ promptIds: PROMPT_IDS, ...greedy });
  assert.deepEqual(ended.ids, KNOWN.slice(0, 4));
  assert.equal(ended.finish_reason, 'length');
  small.close();
  assert.throws(() => small.generate('x'), /closed/);
  // The module still serves after all of that.
  assert.deepEqual(model.generateIds(PROMPT_IDS, greedy), KNOWN);
});
