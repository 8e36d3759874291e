import { assert, describe, it } from "@effect/vitest"
import { Deferred, Duration, Effect, Exit, Fiber, Layer, Option, Scope } from "effect"
import { TestClock } from "effect/testing"
import * as InMemoryKafka from "../src/InMemoryKafka.ts"
import * as KafkaClient from "../src/KafkaClient.ts"
import * as KafkaProducer from "../src/KafkaProducer.ts"

const text = (bytes: Uint8Array | null) => (bytes === null ? null : new TextDecoder().decode(bytes))

describe("InMemoryKafka", () => {
  it.effect("timestamps come from the Clock, so TestClock sets them", () =>
    Effect.gen(function* () {
      yield* TestClock.setTime(Date.UTC(2030, 0, 1))
      yield* InMemoryKafka.produce("events", [{ value: "a" }])
      const [record] = yield* InMemoryKafka.records("events")
      assert.strictEqual(record?.timestamp, Date.UTC(2030, 0, 1))
    }).pipe(Effect.provide(InMemoryKafka.layer({ topics: [{ topic: "events", partitions: 1 }] })))
  )

  it.effect("null-key records go round-robin over the partitions", () =>
    Effect.gen(function* () {
      const metadata = yield* InMemoryKafka.produce(
        "events",
        Array.from({ length: 6 }, (_, i) => ({ value: `v${i}` }))
      )
      assert.deepStrictEqual(
        metadata.map((m) => m.partition),
        [0, 1, 2, 0, 1, 2]
      )
    }).pipe(Effect.provide(InMemoryKafka.layer({ topics: [{ topic: "events", partitions: 3 }] })))
  )

  it.effect("two layers are two brokers", () =>
    Effect.gen(function* () {
      const topics = { topics: [{ topic: "events", partitions: 1 }] }
      yield* InMemoryKafka.produce("events", [{ value: "only in the first" }]).pipe(
        Effect.provide(InMemoryKafka.layer(topics))
      )
      const second = yield* InMemoryKafka.records("events").pipe(Effect.provide(InMemoryKafka.layer(topics)))
      assert.deepStrictEqual(second, [])
    })
  )

  it.effect("auto-creation is off unless asked for", () =>
    Effect.gen(function* () {
      const off = yield* Effect.exit(
        InMemoryKafka.produce("new", [{ value: "x" }]).pipe(Effect.provide(InMemoryKafka.layer()))
      )
      assert.isTrue(Exit.isFailure(off))
      const on = yield* InMemoryKafka.produce("new", [{ value: "x" }]).pipe(
        Effect.andThen(InMemoryKafka.values("new")),
        Effect.provide(InMemoryKafka.layer({ autoCreateTopics: true }))
      )
      assert.deepStrictEqual(on, ["x"])
    })
  )

  it.effect("a rebalance waits for running handlers before moving partitions", () =>
    Effect.gen(function* () {
      const client = yield* KafkaClient.KafkaClient
      yield* client.admin.createTopics([{ topic: "t", partitions: 2 }])
      yield* InMemoryKafka.produce("t", [{ value: "p0", partition: 0 }])
      const entered = yield* Deferred.make<void>()
      const release = yield* Deferred.make<void>()
      const a = yield* client.consumer({ groupId: "g", topics: ["t"], fromBeginning: true })
      yield* a.run(() => Deferred.succeed(entered, undefined).pipe(Effect.andThen(Deferred.await(release))))
      yield* Deferred.await(entered)
      // b joins while a's handler runs: the rebalance, and so b's join, cannot finish before it returns.
      const joining = yield* Effect.forkChild(
        Effect.gen(function* () {
          const b = yield* client.consumer({ groupId: "g", topics: ["t"], fromBeginning: true })
          yield* b.run(() => Effect.void)
          return yield* b.assignment
        })
      )
      yield* Effect.yieldNow
      assert.strictEqual((yield* a.assignment).generation, 1, "a keeps its generation while its handler runs")
      assert.isUndefined(joining.pollUnsafe())
      yield* Deferred.succeed(release, undefined)
      const ofB = yield* Fiber.join(joining)
      assert.strictEqual(ofB.generation, 2)
      assert.deepStrictEqual(
        [...(yield* a.assignment).partitions, ...ofB.partitions].map((tp) => tp.partition).sort(),
        [0, 1]
      )
    }).pipe(Effect.scoped, Effect.provide(InMemoryKafka.layer()))
  )

  it.effect("a member that left its group, or is leaving, cannot commit: ClientFailed, as over kafkajs", () =>
    Effect.gen(function* () {
      const client = yield* KafkaClient.KafkaClient
      yield* client.admin.createTopics([{ topic: "t", partitions: 1 }])
      const left = yield* Effect.scoped(
        Effect.gen(function* () {
          const member = yield* client.consumer({ groupId: "g", topics: ["t"], fromBeginning: true })
          yield* member.run(() => Effect.void)
          return member
        })
      )
      const error = yield* Effect.flip(left.commit([{ topic: "t", partition: 0, offset: 1n }]))
      assert.isTrue(error.reason._tag === "ClientFailed" && error.reason.detail === "the consumer is stopping")
      assert.isFalse(error.retriable)
      // Leaving: the member waits for its running batch call, in which a commit fails the same way.
      yield* InMemoryKafka.produce("t", [{ value: "a" }])
      const inCall = yield* Deferred.make<void>()
      const leave = yield* Deferred.make<void>()
      const during = yield* Deferred.make<Exit.Exit<void, KafkaClient.KafkaError>>()
      const scope = yield* Scope.make()
      const leaving = yield* client
        .consumer({ groupId: "g2", topics: ["t"], fromBeginning: true })
        .pipe(Scope.provide(scope))
      yield* leaving.run((batch) =>
        Effect.gen(function* () {
          yield* Deferred.succeed(inCall, undefined)
          yield* Deferred.await(leave)
          yield* Deferred.succeed(during, yield* Effect.exit(leaving.commit([{ ...batch, offset: 1n }])))
        })
      )
      yield* Deferred.await(inCall)
      const closing = yield* Effect.forkChild(Scope.close(scope, Exit.void))
      yield* Effect.yieldNow
      yield* Deferred.succeed(leave, undefined)
      const failed = Exit.findErrorOption(yield* Deferred.await(during))
      assert.isTrue(Option.isSome(failed) && failed.value.reason._tag === "ClientFailed", "the commit failed")
      yield* Fiber.join(closing)
    }).pipe(Effect.provide(InMemoryKafka.layer()))
  )

  it.effect("awaitCommitted waits for the commit without polling", () =>
    Effect.gen(function* () {
      const client = yield* KafkaClient.KafkaClient
      yield* client.admin.createTopics([{ topic: "t", partitions: 1 }])
      const member = yield* client.consumer({ groupId: "g", topics: ["t"], fromBeginning: true })
      yield* member.run((batch) =>
        Effect.orDie(member.commit([{ ...batch, offset: (batch.records.at(-1)?.offset ?? 0n) + 1n }]))
      )
      const waiting = yield* Effect.forkChild(InMemoryKafka.awaitCommitted("g", "t", 0, 3n))
      yield* InMemoryKafka.produce("t", [{ value: "a" }, { value: "b" }])
      yield* Effect.yieldNow
      assert.isUndefined(waiting.pollUnsafe(), "2 committed, 3 awaited")
      yield* InMemoryKafka.produce("t", [{ value: "c" }])
      assert.strictEqual(yield* Fiber.join(waiting), 3n)
    }).pipe(Effect.scoped, Effect.provide(InMemoryKafka.layer()))
  )

  // The README's example: a handler tested with InMemoryKafka and TestClock, no broker.
  it.effect("README: test a handler that produces a reply after a delay", () =>
    Effect.gen(function* () {
      const client = yield* KafkaClient.KafkaClient
      const orders = yield* client.consumer({ groupId: "billing", topics: ["orders"], fromBeginning: true })
      yield* orders.run((batch) =>
        Effect.forEach(batch.records, (record) =>
          Effect.sleep("5 seconds").pipe(
            Effect.andThen(KafkaProducer.send({ topic: "invoices", key: record.key, value: record.value }))
          )
        ).pipe(Effect.orDie, Effect.asVoid)
      )
      yield* InMemoryKafka.produce("orders", [{ key: "order-1", value: "12.50" }])
      yield* TestClock.adjust("5 seconds")
      assert.deepStrictEqual(yield* InMemoryKafka.values("invoices"), ["12.50"])
    }).pipe(
      Effect.scoped,
      Effect.provide(
        KafkaProducer.layer({ linger: Duration.zero }).pipe(
          Layer.provideMerge(
            InMemoryKafka.layer({
              topics: [
                { topic: "orders", partitions: 3 },
                { topic: "invoices", partitions: 3 }
              ]
            })
          )
        )
      )
    )
  )

  it.effect("records keep key, value and headers as bytes", () =>
    Effect.gen(function* () {
      yield* InMemoryKafka.produce("t", [{ key: "k", value: "v", headers: { h: "x" } }])
      const [record] = yield* InMemoryKafka.records("t")
      assert.strictEqual(text(record?.key ?? null), "k")
      assert.strictEqual(text(record?.value ?? null), "v")
      assert.strictEqual(text(record?.headers.h ?? null), "x")
      assert.isTrue(Option.isNone(Option.fromNullishOr(record?.headers.missing)))
    }).pipe(Effect.provide(InMemoryKafka.layer({ topics: [{ topic: "t", partitions: 1 }] })))
  )
})
