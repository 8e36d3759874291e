import { assert, describe, it } from "@effect/vitest"
import { Deferred, Effect, Fiber } from "effect"
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

  it.effect(
    "100,000 concurrent submits: every job runs once, each key in order, never more than maxInFlight at once",
    () =>
      Effect.gen(function* () {
        const pool = yield* WorkerPool.make({ workers: 8, maxInFlight: 1000 })
        const ran = new Map<string, Array<number>>()
        let most = 0
        yield* Effect.forEach(
          Array.from({ length: 100_000 }, (_, i) => i),
          (i) => {
            const key = `k${i % 500}`
            return pool.submit(
              key,
              Effect.flatMap(pool.inFlight, (inFlight) =>
                Effect.sync(() => {
                  most = Math.max(most, inFlight)
                  const seen = ran.get(key) ?? []
                  seen.push(i)
                  ran.set(key, seen)
                })
              )
            )
          },
          { concurrency: "unbounded", discard: true }
        )
        // Every submit has returned (its job is queued); wait for the pool to run them all.
        while ((yield* pool.inFlight) > 0) yield* Effect.yieldNow
        let total = 0
        for (const [key, order] of ran) {
          total += order.length
          assert.deepStrictEqual(
            order,
            [...order].sort((a, b) => a - b),
            `${key} in submit order`
          )
        }
        assert.strictEqual(total, 100_000)
        assert.isAtMost(most, 1000, "queued or running at once")
        assert.isAbove(most, 500, "the pool was kept full")
      }).pipe(Effect.scoped),
    // Correctness at scale, not speed: about a second here, many more on a machine that is busy with other work.
    120_000
  )

  it.effect("a submit interrupted while it waits for places gives them up: the next in line gets them", () =>
    Effect.gen(function* () {
      const pool = yield* WorkerPool.make({ workers: 1, maxInFlight: 1 })
      const release = yield* Deferred.make<void>()
      const ran: Array<string> = []
      yield* pool.submit(
        "a",
        Effect.andThen(
          Deferred.await(release),
          Effect.sync(() => ran.push("a"))
        )
      )
      const waiting = yield* Effect.forkChild(
        pool.submit(
          "b",
          Effect.sync(() => ran.push("b"))
        )
      )
      const after = yield* Effect.forkChild(
        pool.submit(
          "c",
          Effect.sync(() => ran.push("c"))
        )
      )
      yield* Effect.yieldNow
      yield* Fiber.interrupt(waiting)
      yield* Deferred.succeed(release, undefined)
      yield* Fiber.join(after)
      while ((yield* pool.inFlight) > 0) yield* Effect.yieldNow
      assert.deepStrictEqual(ran, ["a", "c"])
    }).pipe(Effect.scoped)
  )

  it.effect("a big submit at the head of the line, interrupted, lets the smaller ones behind it go at once", () =>
    Effect.gen(function* () {
      const pool = yield* WorkerPool.make({ workers: 1, maxInFlight: 4 })
      const hold = yield* Deferred.make<void>()
      yield* pool.submitTo(0, Deferred.await(hold), 3)
      // One place is free: the big one (4) waits at the head; the small one (1) waits behind it.
      const big = yield* Effect.forkChild(pool.submitTo(0, Effect.void, 4))
      const small = yield* Effect.forkChild(pool.submit("k", Effect.void))
      yield* Effect.yieldNow
      assert.isUndefined(small.pollUnsafe(), "behind the big one")
      yield* Fiber.interrupt(big)
      yield* Fiber.join(small)
      yield* Deferred.succeed(hold, undefined)
    }).pipe(Effect.scoped)
  )
})
