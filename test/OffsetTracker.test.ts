import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import * as OffsetTracker from "../src/OffsetTracker.ts"
import { random } from "./support/random.ts"

describe("OffsetTracker", () => {
  it.effect("commits up to the first unfinished record, then past it once it finishes", () =>
    Effect.sync(() => {
      const tracker = OffsetTracker.make()
      for (const offset of [10n, 11n, 12n]) tracker.delivered("t", 0, offset)
      assert.strictEqual(tracker.committable("t", 0), 10n)
      tracker.finished("t", 0, 12n)
      tracker.finished("t", 0, 11n)
      assert.strictEqual(tracker.committable("t", 0), 10n, "10 is still running")
      tracker.finished("t", 0, 10n)
      assert.strictEqual(tracker.committable("t", 0), 13n)
      assert.strictEqual(tracker.inFlight(), 0)
    })
  )

  it.effect("offsets with gaps (compaction, transaction markers) commit past the gap", () =>
    Effect.sync(() => {
      const tracker = OffsetTracker.make()
      tracker.delivered("t", 0, 5n)
      tracker.delivered("t", 0, 9n)
      tracker.finished("t", 0, 5n)
      assert.strictEqual(tracker.committable("t", 0), 9n)
      tracker.finished("t", 0, 9n)
      assert.strictEqual(tracker.committable("t", 0), 10n)
    })
  )

  it.effect("takeCommits offers each partition once per move, and again after a rollback", () =>
    Effect.sync(() => {
      const tracker = OffsetTracker.make()
      tracker.delivered("t", 0, 0n)
      tracker.delivered("t", 1, 0n)
      tracker.finished("t", 0, 0n)
      const first = tracker.takeCommits()
      assert.deepStrictEqual(first, [
        { topic: "t", partition: 0, offset: 1n, records: 1 },
        { topic: "t", partition: 1, offset: 0n, records: 0 }
      ])
      assert.deepStrictEqual(tracker.takeCommits(), [], "nothing moved")
      tracker.rollback(first)
      assert.strictEqual(tracker.takeCommits().length, 2, "a failed commit is offered again")
    })
  )

  it.effect("forgetting a revoked partition drops its in-flight count", () =>
    Effect.sync(() => {
      const tracker = OffsetTracker.make()
      tracker.delivered("t", 0, 0n)
      tracker.delivered("t", 0, 1n)
      tracker.finished("t", 0, 1n)
      tracker.delivered("t", 1, 0n)
      assert.strictEqual(tracker.inFlight(), 2)
      assert.strictEqual(tracker.forget("t", 0), 2, "two delivered, none committed")
      assert.strictEqual(tracker.inFlight(), 1)
      assert.isUndefined(tracker.committable("t", 0))
    })
  )

  it.effect(
    "property: under random completion orders the committable offset never passes an unfinished record",
    () =>
      Effect.sync(() => {
        for (let seed = 1; seed <= 300; seed++) {
          const next = random(seed)
          const tracker = OffsetTracker.make()
          const count = 1 + Math.floor(next() * 200)
          // Delivered offsets with random gaps.
          const offsets: Array<bigint> = []
          let offset = BigInt(Math.floor(next() * 1000))
          for (let i = 0; i < count; i++) {
            offsets.push(offset)
            offset += 1n + (next() < 0.1 ? BigInt(Math.floor(next() * 5)) : 0n)
          }
          const unfinished = new Set(offsets)
          let delivered = 0
          const inFlight: Array<bigint> = []
          while (unfinished.size > 0) {
            // Deliver a few, finish a random one of those in flight.
            const deliverNow = Math.min(offsets.length - delivered, Math.floor(next() * 4))
            for (let i = 0; i < deliverNow; i++) {
              const o = offsets[delivered++] as bigint
              tracker.delivered("t", 0, o)
              inFlight.push(o)
            }
            if (inFlight.length === 0) continue
            const [done] = inFlight.splice(Math.floor(next() * inFlight.length), 1) as [bigint]
            tracker.finished("t", 0, done)
            unfinished.delete(done)
            const committable = tracker.committable("t", 0) ?? 0n
            // biome-ignore lint/complexity/useMathMinMax: bigints, which Math.min does not take
            const lowestUnfinished = [...unfinished].reduce((a, b) => (a < b ? a : b), offset)
            assert.isTrue(
              committable <= lowestUnfinished,
              `seed ${seed}: ${committable} passes unfinished ${lowestUnfinished}`
            )
            // Everything below the committable offset that was delivered has finished.
            for (const o of offsets.slice(0, delivered)) {
              if (o < committable) assert.isFalse(unfinished.has(o), `seed ${seed}: ${o} < ${committable} unfinished`)
            }
          }
          assert.strictEqual(tracker.committable("t", 0), (offsets.at(-1) as bigint) + 1n, `seed ${seed}: all done`)
          assert.strictEqual(tracker.inFlight(), 0)
        }
      }),
    // CPU-bound (300 seeds); on a busy 2-core machine it can pass vitest's default 5 s.
    30_000
  )
})
