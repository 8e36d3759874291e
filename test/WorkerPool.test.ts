import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import { partitionForKey } from "../src/internal/murmur2.ts"
import * as WorkerPool from "../src/WorkerPool.ts"

describe("WorkerPool", () => {
  it.effect("the keys of one partition spread over all workers (the shard hash is not the partitioner's)", () =>
    Effect.sync(() => {
      for (const [partitions, workers] of [
        [4, 8],
        [6, 12],
        [12, 64]
      ] as const) {
        const keys = Array.from({ length: 5000 }, (_, i) => `key-${i}`).filter(
          (k) => partitionForKey(k, partitions) === 0
        )
        const shards = new Set(keys.map((k) => WorkerPool.shardOf(k, workers)))
        assert.strictEqual(shards.size, workers, `${partitions} partitions, ${workers} workers`)
      }
    })
  )
})
