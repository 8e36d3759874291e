import { assert, describe, it } from "@effect/vitest"
import { Effect, Exit } from "effect"
import { inject } from "vitest"
import * as Broker from "../scripts/kafka/broker.ts"
import { smokeRoundTrip } from "./support/smoke.ts"

const brokers = inject("kafkaBrokers")

describe("smoke: kafkajs against the real broker", () => {
  it.live("100 keyed records with headers arrive once each, intact, and their offsets are committed", () =>
    Effect.gen(function* () {
      const result = yield* smokeRoundTrip({ brokers, records: 100, partitions: 3 })

      assert.strictEqual(result.consumed.length, 100, "every record consumed, none twice")
      const byIndex = new Map(
        result.consumed.map((record) => [JSON.parse(record.value ?? "null").index as number, record])
      )
      assert.strictEqual(byIndex.size, 100, "no index consumed twice")
      const partitionOfKey = new Map<string, number>()
      for (let i = 0; i < 100; i++) {
        const record = byIndex.get(i)
        assert.isDefined(record, `record ${i} arrived`)
        if (record === undefined) continue
        assert.strictEqual(record.key, `key-${i % 10}`)
        assert.deepStrictEqual(record.headers, { "x-index": String(i), "x-source": "smoke" })
        const seen = partitionOfKey.get(`key-${i % 10}`) ?? record.partition
        assert.strictEqual(record.partition, seen, `key-${i % 10} stays on one partition`)
        partitionOfKey.set(`key-${i % 10}`, record.partition)
      }
      // The group's committed offset of each partition is its high watermark: everything read was committed.
      assert.strictEqual(result.highWatermarks.size, 3)
      for (const [partition, high] of result.highWatermarks) {
        assert.strictEqual(result.committed.get(partition), high, `partition ${partition} committed up to ${high}`)
      }
      const total = [...result.committed.values()].reduce((sum, offset) => sum + Number(offset), 0)
      assert.strictEqual(total, 100)
    }).pipe(Effect.scoped)
  )

  // A broker of its own, so killing it does not take the other tests' broker down.
  it.live(
    "a broker killed mid-run makes the round trip fail with the broker's address and the step, not hang",
    () =>
      Effect.gen(function* () {
        const broker = yield* Broker.acquire()
        const startedAt = performance.now()
        const exit = yield* smokeRoundTrip({
          brokers: broker.brokers,
          records: 100,
          partitions: 3,
          afterProduce: Effect.sync(() => process.kill(broker.pid, "SIGKILL")),
          timeout: "90 seconds"
        }).pipe(Effect.scoped, Effect.exit)
        const seconds = (performance.now() - startedAt) / 1000

        assert.isTrue(Exit.isFailure(exit), "the round trip fails")
        const error = Exit.findErrorOption(exit)
        assert.isTrue(error._tag === "Some", "with a typed SmokeError, not a defect")
        if (error._tag === "Some") {
          assert.include(error.value.message, broker.brokers)
          assert.notInclude(error.value.step, "round trip", "a kafkajs step failed; the overall timeout did not fire")
        }
        assert.isBelow(seconds, 60)
      }).pipe(Effect.scoped),
    180_000
  )
})
