// bitnet-rs in WebAssembly: a small wrapper over bitnet_wasm.wasm (built by
// scripts/wasm.sh). Runs in Node.js (18+) and in browsers: the few WASI
// calls the module makes (clock, random numbers, writing to stderr) are
// answered here, so no WASI runtime is needed.
//
//   import { Bitnet } from './bitnet.mjs';
//   const bitnet = await Bitnet.instantiate();          // the .wasm beside this file
//   const model = bitnet.loadModel(ggufBytes, { context: 256 });
//   model.generate('Once upon a time', { maxTokens: 20, temperature: 0 });
//   for (const piece of model.stream('Once upon a time')) process.stdout.write(piece);
//   model.close();
//
// Options are the engine's (see wasm/src/api.rs), in camelCase or snake_case:
// maxTokens, temperature, topK, topP, minP, repeatPenalty, seed, stop,
// ignoreEos, logitBias ({tokenId: bias}; JSON has no -Infinity, so ban a
// token with -100), responseFormat (OpenAI's, e.g.
// {type: 'json_schema', json_schema: {schema: {...}}}), grammar (GBNF, as
// llama.cpp's: 'root ::= ...'). Sampling defaults are the CLI's; temperature 0 is greedy.

export class BitnetError extends Error {
  constructor(message) {
    super(message);
    this.name = 'BitnetError';
  }
}

const WASI_EBADF = 8;
const WASI_ENOSYS = 52;

/** The WASI preview-1 imports the module uses, without a file system. */
function wasiImports(getMemory) {
  const decoder = new TextDecoder();
  const lines = { 1: '', 2: '' };
  const view = () => new DataView(getMemory().buffer);
  return {
    random_get(ptr, len) {
      const bytes = new Uint8Array(getMemory().buffer, ptr, len);
      for (let at = 0; at < len; at += 65536) crypto.getRandomValues(bytes.subarray(at, Math.min(len, at + 65536)));
      return 0;
    },
    clock_time_get(id, _precision, out) {
      const ns = id === 0 ? BigInt(Date.now()) * 1000000n : BigInt(Math.round(performance.now() * 1e6));
      view().setBigUint64(out, ns, true);
      return 0;
    },
    environ_sizes_get(count, size) {
      view().setUint32(count, 0, true);
      view().setUint32(size, 0, true);
      return 0;
    },
    environ_get: () => 0,
    fd_write(fd, iovs, iovsLen, written) {
      if (fd !== 1 && fd !== 2) return WASI_EBADF;
      const v = view();
      let total = 0;
      for (let i = 0; i < iovsLen; i++) {
        const ptr = v.getUint32(iovs + 8 * i, true);
        const len = v.getUint32(iovs + 8 * i + 4, true);
        lines[fd] += decoder.decode(new Uint8Array(getMemory().buffer, ptr, len), { stream: true });
        total += len;
      }
      let nl;
      while ((nl = lines[fd].indexOf('\n')) >= 0) {
        (fd === 1 ? console.log : console.error)(lines[fd].slice(0, nl));
        lines[fd] = lines[fd].slice(nl + 1);
      }
      v.setUint32(written, total, true);
      return 0;
    },
    fd_prestat_get: () => WASI_EBADF,
    fd_prestat_dir_name: () => WASI_EBADF,
    fd_fdstat_get: () => WASI_EBADF,
    fd_filestat_get: () => WASI_EBADF,
    fd_close: () => WASI_EBADF,
    fd_read: () => WASI_EBADF,
    fd_seek: () => WASI_EBADF,
    path_open: () => WASI_ENOSYS,
    path_filestat_get: () => WASI_ENOSYS,
    sched_yield: () => 0,
    proc_exit(code) {
      throw new BitnetError(`the WebAssembly module exited (code ${code})`);
    },
  };
}

const snake = (key) => key.replace(/[A-Z]/g, (c) => '_' + c.toLowerCase());
const snakeKeys = (obj) => Object.fromEntries(Object.entries(obj ?? {}).filter(([, v]) => v !== undefined).map(([k, v]) => [snake(k), v]));

/** One instance of the module: its memory holds the models loaded into it. */
export class Bitnet {
  /**
   * Compiles and instantiates the module: `source` is a path or URL of the
   * .wasm file, its bytes, or a compiled WebAssembly.Module [default: the
   * bitnet_wasm.wasm beside this file].
   */
  static async instantiate(source) {
    let module = source;
    if (!(module instanceof WebAssembly.Module)) {
      let bytes = source;
      if (bytes === undefined || typeof bytes === 'string' || bytes instanceof URL) {
        const url = bytes === undefined ? new URL('./bitnet_wasm.wasm', import.meta.url) : bytes;
        if (typeof process !== 'undefined' && process.versions?.node && (typeof url === 'string' || url.protocol === 'file:')) {
          const { readFile } = await import('node:fs/promises');
          bytes = await readFile(url);
        } else {
          bytes = await (await fetch(url)).arrayBuffer();
        }
      }
      module = await WebAssembly.compile(bytes);
    }
    let memory;
    const instance = await WebAssembly.instantiate(module, { wasi_snapshot_preview1: wasiImports(() => memory) });
    memory = instance.exports.memory;
    instance.exports._initialize?.();
    return new Bitnet(instance.exports);
  }

  constructor(exports) {
    this.x = exports;
    this.encoder = new TextEncoder();
    this.decoder = new TextDecoder();
  }

  /** The engine's version. */
  get version() {
    this.x.bitnet_version();
    return this.result();
  }

  /** The last call's result as text. */
  result() {
    const ptr = this.x.bitnet_result_ptr();
    const len = this.x.bitnet_result_len();
    return this.decoder.decode(new Uint8Array(this.x.memory.buffer, ptr, len));
  }

  /** Throws the last call's message when `status` says it failed. */
  check(status) {
    if (status < 0) throw new BitnetError(this.result());
    return status;
  }

  /** Copies `bytes` into the module's memory: [ptr, len]. */
  put(bytes) {
    const ptr = this.x.bitnet_alloc(bytes.length);
    if (ptr === 0 && bytes.length > 0) throw new BitnetError(`cannot allocate ${bytes.length} bytes in WebAssembly memory`);
    new Uint8Array(this.x.memory.buffer, ptr, bytes.length).set(bytes);
    return [ptr, bytes.length];
  }

  /** Runs `f(ptr, len)` on a copy of `bytes`, then frees the copy. */
  withBytes(bytes, f) {
    const [ptr, len] = this.put(bytes);
    try {
      return f(ptr, len);
    } finally {
      this.x.bitnet_free(ptr, len);
    }
  }

  withJson(value, f) {
    return this.withBytes(this.encoder.encode(JSON.stringify(value)), f);
  }

  /**
   * Loads a GGUF model from its bytes (an ArrayBuffer, Uint8Array or Node
   * Buffer). `options`: context (positions a sequence may hold), parallel
   * (generations open at once, default 1), chatTemplate (a built-in
   * template's name or a Jinja template), cacheType ("f32", the default,
   * or "f16": half the KV cache's memory, lossy).
   */
  loadModel(bytes, options = {}) {
    const data = bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes);
    const [ptr, len] = this.put(data);
    // The model's bytes are the engine's from here on, loaded or not.
    const opts = this.encoder.encode(JSON.stringify(snakeKeys(options)));
    const handle = this.withBytes(opts, (op, ol) => this.x.bitnet_model_load(ptr, len, op, ol));
    if (handle === 0) throw new BitnetError(`loading the model: ${this.result()}`);
    return new Model(this, handle);
  }
}

/** A loaded model. */
export class Model {
  constructor(bitnet, handle) {
    this.b = bitnet;
    this.handle = handle;
  }

  h() {
    if (this.handle === 0) throw new BitnetError('the model is closed');
    return this.handle;
  }

  /** Architecture and hyper-parameters. */
  get info() {
    this.b.check(this.b.x.bitnet_model_info(this.h()));
    return JSON.parse(this.b.result());
  }

  /** Token ids of `text`; BOS first when `addBos`; `special`: special-token text becomes those tokens. */
  tokenize(text, { addBos = true, special = false } = {}) {
    const h = this.h();
    this.b.check(this.b.withBytes(this.b.encoder.encode(text), (p, l) => this.b.x.bitnet_tokenize(h, p, l, addBos, special)));
    return JSON.parse(this.b.result());
  }

  /** The text of `ids`. */
  detokenize(ids) {
    const h = this.h();
    this.b.check(this.b.withJson(Array.from(ids), (p, l) => this.b.x.bitnet_detokenize(h, p, l)));
    return this.b.result();
  }

  start(request) {
    const h = this.h();
    const g = this.b.withJson(snakeKeys(request), (p, l) => this.b.x.bitnet_generate_start(h, p, l));
    if (g === 0) throw new BitnetError(this.b.result());
    return g;
  }

  finish(g) {
    this.b.check(this.b.x.bitnet_generate_finish(g));
    return JSON.parse(this.b.result());
  }

  /** Runs a request to its end: { text, ids, finish_reason, usage }. */
  complete(request) {
    return this.finish(this.start(request));
  }

  /** Text generated after `prompt` (BOS added as the model asks, as `bitnet run -p`). */
  generate(prompt, options = {}) {
    return this.complete({ ...options, prompt }).text;
  }

  /** Ids generated after `promptIds`, used verbatim (as `bitnet run --prompt-ids`). */
  generateIds(promptIds, options = {}) {
    return this.complete({ ...options, promptIds: Array.from(promptIds) }).ids;
  }

  /** The reply to `messages` ([{ role, content }]) rendered with the chat template. */
  chat(messages, options = {}) {
    return this.complete({ ...options, messages }).text;
  }

  /** Like `generate`, a piece of text at a time; leaving the loop early stops the generation. */
  *stream(prompt, options = {}) {
    yield* this.streamRequest({ ...options, prompt });
  }

  *streamRequest(request) {
    const g = this.start(request);
    let open = true;
    try {
      for (;;) {
        const status = this.b.check(this.b.x.bitnet_generate_next(g));
        if (status === 0) break;
        const piece = this.b.result();
        if (piece) yield piece;
      }
      open = false;
      this.b.check(this.b.x.bitnet_generate_cancel(g));
    } finally {
      if (open) this.b.x.bitnet_generate_cancel(g);
    }
  }

  /** Frees the model's memory. */
  close() {
    if (this.handle !== 0) this.b.x.bitnet_model_free(this.handle);
    this.handle = 0;
  }
}
