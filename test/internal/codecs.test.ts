import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import * as Snappy from "snappy"
import { CodecError, codecs } from "../../src/internal/codecs.ts"

const sample = Buffer.from(JSON.stringify(Array.from({ length: 3000 }, (_, i) => ({ id: `e${i}`, n: i }))))

describe("codecs", () => {
  for (const [name, codec] of Object.entries(codecs)) {
    it.effect(`${name}: what it compresses it decompresses, and corrupt data fails with CodecError`, () =>
      Effect.promise(async () => {
        const compressed = await codec.compress(sample)
        assert.isBelow(compressed.length, sample.length, "smaller")
        assert.isTrue((await codec.decompress(compressed)).equals(sample), "round trip")
        const corrupt = Buffer.from(compressed)
        corrupt.fill(0xa5, Math.floor(corrupt.length / 3))
        const failure = await codec.decompress(corrupt).then(
          () => undefined,
          (error: unknown) => error
        )
        assert.instanceOf(failure, CodecError)
        assert.include((failure as CodecError).message, `${name} batch could not be decompressed`)
      })
    )
  }

  it.effect(
    "snappy: writes xerial's framing in 32 KiB blocks (as Java), and reads a plain block too (as librdkafka writes)",
    () =>
      Effect.promise(async () => {
        const framed = await codecs.snappy.compress(sample)
        assert.deepStrictEqual([...framed.subarray(0, 8)], [0x82, 0x53, 0x4e, 0x41, 0x50, 0x50, 0x59, 0x00])
        const blocks = Math.ceil(sample.length / 32768)
        assert.isAbove(blocks, 1)
        let at = 16
        let count = 0
        while (at < framed.length) {
          at += 4 + framed.readInt32BE(at)
          count++
        }
        assert.strictEqual(count, blocks)
        const plain = await Snappy.compress(sample)
        assert.isTrue((await codecs.snappy.decompress(plain)).equals(sample))
      })
  )
})
