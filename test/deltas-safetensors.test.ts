import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ServeError } from '../src/errors.js';
import { encodeSafetensors, parseSafetensors } from '../src/deltas/safetensors.js';

/** A safetensors file built byte by byte, independent of the writer under test. */
function handMade(header: Record<string, unknown>, data: Uint8Array, declaredLength?: number): Uint8Array {
  const json = Buffer.from(JSON.stringify(header), 'utf8');
  const out = new Uint8Array(8 + json.length + data.length);
  new DataView(out.buffer).setBigUint64(0, BigInt(declaredLength ?? json.length), true);
  out.set(json, 8);
  out.set(data, 8 + json.length);
  return out;
}

function refusal(fn: () => unknown): ServeError {
  try {
    fn();
  } catch (err) {
    assert.ok(err instanceof ServeError, `expected a ServeError, got ${err}`);
    assert.equal(err.status, 422);
    return err;
  }
  assert.fail('expected a refusal');
}

test('reads F32, F16 and BF16 from hand-made bytes', () => {
  const data = new Uint8Array(16);
  const v = new DataView(data.buffer);
  v.setFloat32(0, 1.5, true);
  v.setFloat32(4, -2.25, true);
  v.setUint16(8, 0x3c00, true); // f16 1.0
  v.setUint16(10, 0xc500, true); // f16 -5.0
  v.setUint16(12, 0x3f80, true); // bf16 1.0
  v.setUint16(14, 0x4049, true); // bf16 3.140625
  const file = handMade(
    {
      __metadata__: { format: 'pt' },
      a: { dtype: 'F32', shape: [2], data_offsets: [0, 8] },
      h: { dtype: 'F16', shape: [2], data_offsets: [8, 12] },
      b: { dtype: 'BF16', shape: [1, 2], data_offsets: [12, 16] },
    },
    data,
  );
  const st = parseSafetensors(file, 'x.safetensors');
  assert.deepEqual(st.metadata, { format: 'pt' });
  assert.deepEqual([...st.read('a')], [1.5, -2.25]);
  assert.deepEqual([...st.read('h')], [1, -5]);
  assert.deepEqual([...st.read('b')], [1, 3.140625]);
  assert.deepEqual(st.tensors.get('b')!.shape, [1, 2]);
});

test('aligned F32 is a zero-copy view into the file', () => {
  const file = encodeSafetensors({ w: { dtype: 'F32', shape: [3], data: new Float32Array([1, 2, 3]) } });
  const view = parseSafetensors(file, 'w.safetensors').read('w');
  assert.equal(view.buffer, file.buffer);
  file[file.length - 4] ^= 0xff; // changing the file changes the view
  assert.notEqual(view[2], 3);
});

test('writer round-trips each dtype within its rounding', () => {
  const data = new Float32Array([0, 1, -1, 0.1, 65504, 1e-6, -3.3e-5, 123.456]);
  for (const [dtype, rel] of [['F32', 0], ['F16', 2 ** -11], ['BF16', 2 ** -8]] as const) {
    const st = parseSafetensors(encodeSafetensors({ t: { dtype, shape: [8], data } }), 't');
    const got = st.read('t');
    data.forEach((x, i) => {
      // f16 subnormals are spaced 2^-24 apart.
      const tol = Math.abs(x) * rel + (dtype === 'F16' ? 2 ** -25 : 0);
      assert.ok(Math.abs(got[i] - x) <= tol, `${dtype}[${i}]: ${got[i]} vs ${x}`);
    });
  }
});

test('header length beyond the file is refused', () => {
  const err = refusal(() => parseSafetensors(handMade({}, new Uint8Array(0), 1_000_000), 'f'));
  assert.match(err.message, /declares a 1000000-byte header but the file is \d+ bytes/);
});

test('a file shorter than 8 bytes is refused', () => {
  assert.match(refusal(() => parseSafetensors(new Uint8Array(5), 'f')).message, /too short/);
});

test('header that is not JSON is refused', () => {
  const bad = handMade({}, new Uint8Array(0));
  bad[8] = 0x7b;
  bad[9] = 0x78; // "{x"
  assert.match(refusal(() => parseSafetensors(bad, 'f')).message, /not valid UTF-8 JSON/);
});

test('every bad tensor entry is listed, not just the first', () => {
  const err = refusal(() =>
    parseSafetensors(
      handMade(
        {
          outside: { dtype: 'F32', shape: [4], data_offsets: [0, 16] },
          wrong_size: { dtype: 'F32', shape: [3], data_offsets: [0, 8] },
          f64: { dtype: 'F64', shape: [1], data_offsets: [0, 8] },
          shape: { dtype: 'F32', shape: [-1], data_offsets: [0, 4] },
          x: { dtype: 'F32', shape: [1], data_offsets: [0, 4] },
          y: { dtype: 'F32', shape: [1], data_offsets: [2, 6] },
        },
        new Uint8Array(8),
      ),
      'w.safetensors',
    ),
  );
  const d = err.details!.join('\n');
  assert.match(d, /tensor 'outside' ends at byte 16 of a 8-byte data region/);
  assert.match(d, /tensor 'wrong_size' is F32 \[3\] = 12 bytes but its data_offsets span 8/);
  assert.match(d, /tensor 'f64' has dtype "F64"; deltaserve reads F32, F16 and BF16/);
  assert.match(d, /tensor 'shape' has an invalid shape/);
  assert.match(d, /tensors 'x' and 'y' overlap/);
  assert.equal(err.details!.length, 5);
  assert.equal(err.code, 'unsupported_delta');
});
