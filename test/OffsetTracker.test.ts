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
      assert.strictEqual(tracker.rollback(first), 0, "every partition is still tracked")
      assert.strictEqual(tracker.takeCommits().length, 2, "a failed commit is offered again")
    })
  )

  it.effect("a rollback for a partition forgotten meanwhile returns its records, which nothing will offer again", () =>
    Effect.sync(() => {
      const tracker = OffsetTracker.make()
      tracker.delivered("t", 0, 0n)
      tracker.delivered("t", 0, 1n)
      tracker.finished("t", 0, 0n)
      tracker.finished("t", 0, 1n)
      const commits = tracker.takeCommits()
      assert.strictEqual(tracker.forget("t", 0), 0, "all of it was handed to the commit")
      assert.strictEqual(tracker.rollback(commits), 2, "the commit failed: its two records' places go back")
      assert.deepStrictEqual(tracker.takeCommits(), [])
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

  it.effect("a partition tracker finishes by sequence number, past its initial capacity, in any order", () =>
    Effect.sync(() => {
      const tracker = OffsetTracker.make()
      const partition = tracker.partition("t", 0)
      // 5000 in flight at once outgrows the ring's first 1024 places; every other offset is a gap.
      const sequences = Array.from({ length: 5000 }, (_, i) => partition.delivered(BigInt(100 + 2 * i)))
      for (let i = sequences.length - 1; i >= 1; i--) partition.finished(sequences[i] as number)
      assert.strictEqual(tracker.committable("t", 0), 100n, "the first record is still running")
      assert.strictEqual(tracker.inFlight(), 1)
      partition.finished(sequences[0] as number)
      assert.strictEqual(tracker.committable("t", 0), BigInt(100 + 2 * 4999 + 1))
      assert.strictEqual(tracker.inFlight(), 0)
      assert.deepStrictEqual(tracker.takeCommits(), [
        { topic: "t", partition: 0, offset: BigInt(100 + 2 * 4999 + 1), records: 5000 }
      ])
    })
  )

  it.effect("a partition tracker taken before forget no longer counts: late finishes change nothing", () =>
    Effect.sync(() => {
      const tracker = OffsetTracker.make()
      const stale = tracker.partition("t", 0)
      const sequence = stale.delivered(7n)
      assert.strictEqual(tracker.forget("t", 0), 1)
      const fresh = tracker.partition("t", 0)
      fresh.delivered(7n)
      stale.finished(sequence)
      assert.strictEqual(tracker.committable("t", 0), 7n, "the redelivered record is not finished")
      assert.strictEqual(tracker.inFlight(), 1)
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
