// The WebAssembly package in a real headless Chromium: a page imports
// bitnet.mjs over HTTP (the browser's fetch and WebAssembly, no Node APIs),
// loads stories260K and generates greedily from the known prompt ids.
// Run by scripts/wasm.sh when playwright-core (tests/browser) and Chromium
// are installed, as scripts/test.sh installs them.
//
//   node wasm/test/browser.mjs [PKG_DIR] [CHROMIUM]
import { createServer } from 'node:http';
import { readFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const [pkg = path.join(root, 'target/wasm/pkg'), executablePath = '/usr/bin/chromium'] = process.argv.slice(2);
const { chromium } = createRequire(path.join(root, 'tests/browser/package.json'))('playwright-core');
const KNOWN = [432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 410, 408, 419, 292];

const files = {
  '/bitnet.mjs': [path.join(pkg, 'bitnet.mjs'), 'text/javascript'],
  '/bitnet_wasm.wasm': [path.join(pkg, 'bitnet_wasm.wasm'), 'application/wasm'],
  '/stories260K.gguf': [path.join(root, 'testdata/models/stories260K/stories260K.gguf'), 'application/octet-stream'],
};
const page = `<!doctype html><meta charset="utf-8"><pre id="out"></pre><script type="module">
import { Bitnet } from './bitnet.mjs';
try {
  const bitnet = await Bitnet.instantiate();
  const model = bitnet.loadModel(await (await fetch('./stories260K.gguf')).arrayBuffer());
  const ids = model.generateIds([1, 403, 407, 261, 378], { maxTokens: 20, temperature: 0 });
  let text = '';
  for (const piece of model.stream('Once upon a time', { maxTokens: 20, temperature: 0 })) text += piece;
  window.result = { ids, text, same: text === model.generate('Once upon a time', { maxTokens: 20, temperature: 0 }) };
} catch (e) {
  window.result = { error: String(e && e.stack || e) };
}
</script>`;
const server = createServer(async (req, res) => {
  const f = files[req.url];
  if (req.url === '/') {
    res.writeHead(200, { 'Content-Type': 'text/html' }).end(page);
  } else if (f) {
    res.writeHead(200, { 'Content-Type': f[1] }).end(await readFile(f[0]));
  } else {
    res.writeHead(404).end();
  }
});
await new Promise((r) => server.listen(0, '127.0.0.1', r));
const browser = await chromium.launch({ executablePath, args: ['--no-sandbox', '--disable-gpu', '--no-first-run'] });
let failed = null;
try {
  const tab = await browser.newPage();
  const errors = [];
  tab.on('pageerror', (e) => errors.push(e.message));
  await tab.goto(`http://127.0.0.1:${server.address().port}/`);
  await tab.waitForFunction(() => window.result !== undefined, null, { timeout: 60000 });
  const r = await tab.evaluate(() => window.result);
  if (r.error || errors.length) failed = r.error ?? errors.join('; ');
  else if (JSON.stringify(r.ids) !== JSON.stringify(KNOWN)) failed = `greedy ids ${r.ids}, want ${KNOWN}`;
  else if (!r.same || !r.text.startsWith(', there was a little')) failed = `streamed text ${JSON.stringify(r.text)} (same as generate: ${r.same})`;
  else console.log(`ok: Chromium ran stories260K in WebAssembly: ${JSON.stringify(r.text)}`);
} finally {
  await browser.close();
  server.close();
}
if (failed) {
  console.error('FAIL: ' + failed);
  process.exit(1);
}
