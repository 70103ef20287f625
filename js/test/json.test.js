// The protocol's JSON (PROTOCOL.md §2): every value keeps its storage class.

import assert from "node:assert/strict";
import { test } from "node:test";
import { Real, parse, stringify } from "../src/json.js";
import { sqlValue } from "../src/json.js";

test("values read and write back exactly", () => {
  const cases = [
    ["-9223372036854775808", -(2n ** 63n)],
    ["9007199254740993", 9007199254740993n],
    ["1", 1n],
    ["1.0", new Real(1)],
    ["-0.0", new Real(-0)],
    ["1e+300", new Real(1e300)],
    ['"text"', "text"],
    ["null", null],
  ];
  for (const [text, value] of cases) {
    assert.deepEqual(parse(text), value, text);
    assert.equal(stringify(value), text === "1e+300" ? "1e+300" : text, text);
  }
  assert.deepEqual(sqlValue(parse('{"blob":"00ff"}')), new Uint8Array([0, 255]));
  assert.deepEqual(sqlValue(parse('{"real":"-inf"}')), new Real(-Infinity));
  assert.equal(stringify(new Uint8Array([1, 171])), '{"blob":"01ab"}');
  assert.equal(stringify(new Real(Infinity)), '{"real":"inf"}');
});

test("what is not a protocol value is refused, naming it", () => {
  assert.throws(() => parse("9223372036854775808"), /outside the 64-bit signed range/);
  assert.throws(() => parse("[1,]"), /bad JSON/);
  assert.throws(() => stringify(1.5), /not an exact integer: use Real/);
  assert.throws(() => sqlValue({ blob: "0" }), /not a hex string/);
  assert.throws(() => sqlValue([1]), /is not an SQLite value/);
});
