import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import { murmur2, partitionForKey } from "../../src/internal/murmur2.ts"
import { kafkajsPartitionFor } from "../support/partitioner.ts"

describe("murmur2 partitioner", () => {
  it.effect("matches kafkajs' DefaultPartitioner (Java-compatible) for 10,000 keys and several partition counts", () =>
    Effect.sync(() => {
      for (const partitions of [1, 3, 6, 12, 100]) {
        const expected = kafkajsPartitionFor("t", partitions)
        for (let i = 0; i < 10_000; i++) {
          // Keys of every length mod 4, and non-ASCII ones.
          const key = `k${i}${"é".repeat(i % 5)}`
          assert.strictEqual(partitionForKey(key, partitions), expected(key), `key ${key} among ${partitions}`)
        }
      }
    })
  )

  it.effect("gives the Java client's values for known inputs", () =>
    Effect.sync(() => {
      // From Kafka's own UtilsTest.testMurmur2.
      const cases: ReadonlyArray<readonly [string, number]> = [
        ["21", -973932308],
        ["foobar", -790332482],
        ["a-little-bit-long-string", -985981536],
        ["a-little-bit-longer-string", -1486304829],
        ["lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971]
      ]
      for (const [input, expected] of cases)
        assert.strictEqual(murmur2(new TextEncoder().encode(input)), expected, input)
    })
  )
})
