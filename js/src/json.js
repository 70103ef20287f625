// The protocol's JSON (docs/PROTOCOL.md §2), exactly: an INTEGER is a JSON
// integer read as a BigInt (exact over all of i64), a REAL keeps a fraction
// or an exponent (`Real`), a BLOB is {"blob": "<hex>"} (a Uint8Array), and
// infinities are {"real": "inf" | "-inf"}. JavaScript's own JSON reads
// every number as a double, which would turn 1.0 into 1 and lose integers
// beyond 2^53: this module never does.

/** A REAL value, kept apart from integers even when integral. */
export class Real {
  /** @param {number} value */
  constructor(value) {
    this.value = value;
  }
}

/** Lowercase hex of bytes. */
export function toHex(bytes) {
  let s = "";
  for (const b of bytes) s += b.toString(16).padStart(2, "0");
  return s;
}

/** Bytes of a hex string (an error names what is wrong). */
export function fromHex(hex) {
  if (typeof hex !== "string" || hex.length % 2 !== 0 || /[^0-9a-fA-F]/.test(hex)) {
    throw new Error(`not a hex string: ${JSON.stringify(hex)}`);
  }
  const out = new Uint8Array(hex.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(hex.slice(2 * i, 2 * i + 2), 16);
  return out;
}

const I64_MIN = -(2n ** 63n);
const I64_MAX = 2n ** 63n - 1n;

/**
 * Parses protocol JSON: integers become BigInt, other numbers `Real`;
 * objects, arrays, strings, booleans and null as usual.
 */
export function parse(text) {
  let i = 0;
  const fail = (what) => {
    throw new Error(`bad JSON at offset ${i}: ${what}`);
  };
  const ws = () => {
    while (i < text.length && (text[i] === " " || text[i] === "\t" || text[i] === "\n" || text[i] === "\r")) i++;
  };
  const string = () => {
    const start = i++;
    while (i < text.length && text[i] !== '"') i += text[i] === "\\" ? 2 : 1;
    if (i >= text.length) fail("unterminated string");
    i++;
    return JSON.parse(text.slice(start, i));
  };
  const number = /-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/y;
  const value = () => {
    ws();
    const c = text[i];
    if (c === "{") {
      i++;
      const obj = {};
      ws();
      if (text[i] === "}") {
        i++;
        return obj;
      }
      for (;;) {
        ws();
        if (text[i] !== '"') fail("expected a key");
        const k = string();
        ws();
        if (text[i++] !== ":") fail("expected ':'");
        obj[k] = value();
        ws();
        const d = text[i++];
        if (d === "}") return obj;
        if (d !== ",") fail("expected ',' or '}'");
      }
    }
    if (c === "[") {
      i++;
      const arr = [];
      ws();
      if (text[i] === "]") {
        i++;
        return arr;
      }
      for (;;) {
        arr.push(value());
        ws();
        const d = text[i++];
        if (d === "]") return arr;
        if (d !== ",") fail("expected ',' or ']'");
      }
    }
    if (c === '"') return string();
    for (const [word, v] of [["null", null], ["true", true], ["false", false]]) {
      if (text.startsWith(word, i)) {
        i += word.length;
        return v;
      }
    }
    number.lastIndex = i;
    const m = number.exec(text);
    if (!m) fail("unexpected character");
    i += m[0].length;
    if (m[2] === undefined && m[3] === undefined) {
      const n = BigInt(m[0]);
      if (n < I64_MIN || n > I64_MAX) fail(`the JSON integer ${m[0]} is outside the 64-bit signed range`);
      return n;
    }
    return new Real(Number(m[0]));
  };
  const v = value();
  ws();
  if (i !== text.length) fail("trailing characters");
  return v;
}

function real(x) {
  if (Number.isNaN(x)) throw new Error("NaN is not an SQLite value");
  if (x === Infinity) return '{"real":"inf"}';
  if (x === -Infinity) return '{"real":"-inf"}';
  if (Object.is(x, -0)) return "-0.0";
  const s = String(x); // the shortest text that reads back as exactly x
  return /[.eE]/.test(s) ? s : `${s}.0`;
}

/**
 * Serialises protocol JSON: BigInt as an integer, `Real` with a fraction,
 * Uint8Array as {"blob"}; a plain number must be an exact integer (protocol
 * metadata: versions, limits) and is written as one.
 */
export function stringify(v) {
  if (v === null || v === undefined) return "null";
  if (typeof v === "bigint") return v.toString();
  if (v instanceof Real) return real(v.value);
  if (typeof v === "number") {
    if (!Number.isSafeInteger(v)) throw new Error(`${v} is not an exact integer: use Real for a REAL`);
    return String(v);
  }
  if (typeof v === "string" || typeof v === "boolean") return JSON.stringify(v);
  if (v instanceof Uint8Array) return `{"blob":"${toHex(v)}"}`;
  if (Array.isArray(v)) return `[${v.map(stringify).join(",")}]`;
  return `{${Object.entries(v)
    .filter(([, x]) => x !== undefined)
    .map(([k, x]) => `${JSON.stringify(k)}:${stringify(x)}`)
    .join(",")}}`;
}

/**
 * A decoded JSON value as an SQLite value: BigInt | Real | string |
 * Uint8Array | null (the protocol's value encoding).
 */
export function sqlValue(v) {
  if (v === null || typeof v === "bigint" || typeof v === "string" || v instanceof Real) return v;
  if (typeof v === "object" && !Array.isArray(v)) {
    const keys = Object.keys(v);
    if (keys.length === 1 && keys[0] === "blob") return fromHex(v.blob);
    if (keys.length === 1 && keys[0] === "real" && (v.real === "inf" || v.real === "-inf")) {
      return new Real(v.real === "inf" ? Infinity : -Infinity);
    }
  }
  throw new Error(`${stringify(v)} is not an SQLite value`);
}

/** A protocol integer (BigInt from `parse`) as a JavaScript number. */
export function int(v) {
  if (typeof v === "bigint") {
    if (v > BigInt(Number.MAX_SAFE_INTEGER) || v < BigInt(Number.MIN_SAFE_INTEGER)) {
      throw new Error(`${v} is beyond 2^53: not a protocol version or clock`);
    }
    return Number(v);
  }
  if (typeof v === "number" && Number.isSafeInteger(v)) return v;
  throw new Error(`${stringify(v)} is not an integer`);
}
