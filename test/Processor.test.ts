import { assert, describe, it } from "@effect/vitest"
import { Clock, Duration, Effect, Exit, Fiber, Layer, Logger, Metric, Option, Schedule, Schema } from "effect"
import { TestClock } from "effect/testing"
import * as InMemoryKafka from "../src/InMemoryKafka.ts"
import * as KafkaClient from "../src/KafkaClient.ts"
import * as KafkaProducer from "../src/KafkaProducer.ts"
import * as Metrics from "../src/Metrics.ts"
import * as Observability from "../src/Observability.ts"
import * as Processor from "../src/Processor.ts"
import * as Replay from "../src/Replay.ts"
import * as RetryPolicy from "../src/RetryPolicy.ts"

const Order = Schema.Struct({ id: Schema.String, amount: Schema.Number })

class PaymentDown extends Schema.TaggedError<PaymentDown>()("PaymentDown", { id: Schema.String }) {
  override get message() {
    return `payment service down for ${this.id}`
  }
}

const options = (overrides: Partial<Processor.ProcessorOptions> = {}): Processor.ProcessorOptions => ({
  consumer: {
    groupId: "g",
    workers: 4,
    maxInFlight: 100,
    fromBeginning: true,
    commitInterval: Duration.millis(200),
    shutdownTimeout: Duration.seconds(5)
  },
  retryTopicPrefix: "orders-retry",
  retryMax: 3,
  retryDelays: [Duration.seconds(5), Duration.seconds(30), Duration.minutes(3)],
  dlqTopic: "orders-dlq",
  inPlaceRetry: Schedule.recurs(0),
  ...overrides
})

const allTopics = (partitions: number) =>
  ["orders", "orders-retry-1", "orders-retry-2", "orders-retry-3", "orders-dlq"].map((topic) => ({
    topic,
    partitions
  }))

const setup = (overrides: Partial<Processor.ProcessorOptions> = {}, partitions = 2) =>
  Processor.layer(options(overrides)).pipe(
    Layer.provideMerge(KafkaProducer.layer({ linger: Duration.zero, idempotent: false, acks: -1 })),
    Layer.provideMerge(InMemoryKafka.layer({ topics: allTopics(partitions) }))
  )

/** An in-memory broker whose produce requests holding a record for a topic that `refused` names fail for good. */
const refusingKafka = (refused: (topic: string) => boolean, topics: ReadonlyArray<KafkaClient.TopicSpec>) => {
  const base = InMemoryKafka.layer({ topics })
  const client = Layer.effect(
    KafkaClient.KafkaClient,
    Effect.map(KafkaClient.KafkaClient, (client) =>
      KafkaClient.KafkaClient.of({
        ...client,
        producer: (options) =>
          Effect.map(client.producer(options), (connection) => ({
            send: (records) => {
              const topic = records.find((record) => refused(record.topic))?.topic
              return topic === undefined
                ? connection.send(records)
                : Effect.fail(
                    new KafkaClient.KafkaError({
                      operation: "produce",
                      topic,
                      reason: new KafkaClient.BrokerError({
                        type: "TOPIC_AUTHORIZATION_FAILED",
                        retriable: false,
                        detail: "not authorised"
                      })
                    })
                  )
            }
          }))
      })
    )
  ).pipe(Layer.provide(base))
  // The refusing client last, so that it is the KafkaClient of the merged layer.
  return Layer.merge(base, client)
}

const text = (bytes: Uint8Array | undefined) => (bytes === undefined ? undefined : new TextDecoder().decode(bytes))

/** Moves virtual time in steps until `done` holds. */
const advanceUntil = (done: () => boolean, step: Duration.Input = "100 millis", maxSteps = 100_000) =>
  Effect.gen(function* () {
    for (let i = 0; i < maxSteps && !done(); i++) yield* TestClock.adjust(step)
  })

/** Moves virtual time in steps while `pending` holds. */
const advanceWhile = <E, R>(pending: Effect.Effect<boolean, E, R>, step: Duration.Input, maxSteps = 10_000) =>
  Effect.gen(function* () {
    for (let i = 0; i < maxSteps && (yield* pending); i++) yield* TestClock.adjust(step)
  })

const order = (id: string, amount = 10) => ({ key: id, value: JSON.stringify({ id, amount }) })

/** Runs the Processor, in a fiber of its own, with one handler for "orders" (values decoded as `Order`). */
const runOrders = <E>(
  handle: (message: Processor.Message<typeof Order.Type, Record<string, string>>) => Effect.Effect<void, E>
) => Effect.forkChild(Processor.run([Processor.handler({ topic: "orders", value: Order, handle })]))

/** The headers of a first hop of orders/0@0 to retry-1 by `group`, due at `dueAt` when given. */
const retryHeaders = (group: string, dueAt?: number): Record<string, string> => ({
  [RetryPolicy.headers.originalTopic]: "orders",
  [RetryPolicy.headers.originalPartition]: "0",
  [RetryPolicy.headers.originalOffset]: "0",
  [RetryPolicy.headers.attempt]: "1",
  [RetryPolicy.headers.consumerGroup]: group,
  ...(dueAt === undefined ? {} : { [RetryPolicy.headers.dueAt]: String(dueAt) })
})

describe("Processor", () => {
  it.effect("a retried record is handled at its retry topic's delay, not before", () =>
    Effect.gen(function* () {
      const calls: Array<{ attempt: number; at: number }> = []
      const fiber = yield* Effect.forkChild(
        Processor.run([
          Processor.handler({
            topic: "orders",
            value: Order,
            handle: ({ value, attempt }) =>
              Effect.gen(function* () {
                calls.push({ attempt, at: yield* Clock.currentTimeMillis })
                if (attempt < 2) return yield* new PaymentDown({ id: value.id })
              })
          })
        ])
      )
      yield* InMemoryKafka.produce("orders", [order("o-1")])
      yield* advanceUntil(() => calls.length >= 3, "10 millis")
      assert.deepStrictEqual(
        calls.map((call) => call.attempt),
        [0, 1, 2]
      )
      const [first, second, third] = calls as [(typeof calls)[0], (typeof calls)[0], (typeof calls)[0]]
      // Each hop waits its topic's delay from the failure, to the tick (10 ms steps).
      assert.isTrue(second.at - first.at >= 5_000, `retry-1 after ${second.at - first.at} ms`)
      assert.isTrue(second.at - first.at <= 5_010, `retry-1 after ${second.at - first.at} ms`)
      assert.isTrue(third.at - second.at >= 30_000, `retry-2 after ${third.at - second.at} ms`)
      assert.isTrue(third.at - second.at <= 30_010, `retry-2 after ${third.at - second.at} ms`)
      const stats = yield* (yield* Processor.Processor).stats
      assert.deepStrictEqual(stats.retried, { "orders-retry-1": 1, "orders-retry-2": 1 })
      assert.strictEqual(stats.done, 1)
      assert.deepStrictEqual(yield* InMemoryKafka.records("orders-dlq"), [])
      yield* Fiber.interrupt(fiber)
    }).pipe(Effect.provide(setup()))
  )

  it.effect("with the default, jittered in-place retry, a record on retry-1 still waits its delay", () =>
    Effect.gen(function* () {
      const calls: Array<{ attempt: number; at: number }> = []
      const fiber = yield* runOrders(({ value, attempt }) =>
        Effect.gen(function* () {
          calls.push({ attempt, at: yield* Clock.currentTimeMillis })
          if (attempt < 1) return yield* new PaymentDown({ id: value.id })
        })
      )
      yield* InMemoryKafka.produce("orders", [order("o-1")])
      yield* advanceUntil(() => calls.some((call) => call.attempt === 1), "10 millis")
      const inPlace = calls.filter((call) => call.attempt === 0)
      assert.strictEqual(inPlace.length, 3, "the first try and two in-place retries")
      const lastFailure = (inPlace[2] as (typeof calls)[0]).at
      assert.isFalse(Number.isInteger(lastFailure), `the jittered clock reads fractions (${lastFailure})`)
      const hop = (yield* InMemoryKafka.records("orders-retry-1"))[0]
      const dueAt = text(hop?.headers[RetryPolicy.headers.dueAt])
      assert.match(dueAt ?? "", /^\d+$/, "whole milliseconds")
      const retried = calls.find((call) => call.attempt === 1) as (typeof calls)[0]
      // Kafka's timestamps are whole milliseconds: the delay counts from the millisecond of the failure.
      const waited = retried.at - Math.floor(lastFailure)
      assert.isAtLeast(waited, 5_000, `retry-1 handled ${waited} ms after the failure`)
      yield* Fiber.interrupt(fiber)
    }).pipe(Effect.provide(setup({ inPlaceRetry: undefined })))
  )

  it.effect("an always-failing record climbs exactly N retry topics, then the DLQ, with its history headers", () =>
    Effect.gen(function* () {
      const attempts: Array<number> = []
      const failedAt: Array<number> = []
      const fiber = yield* Effect.forkChild(
        Processor.run([
          Processor.handler({
            topic: "orders",
            value: Order,
            handle: ({ value, attempt }) =>
              Effect.gen(function* () {
                attempts.push(attempt)
                failedAt.push(yield* Clock.currentTimeMillis)
                return yield* new PaymentDown({ id: value.id })
              })
          })
        ])
      )
      const [produced] = yield* InMemoryKafka.produce("orders", [
        {
          ...order("o-7", 42),
          // A history of ours on a main-topic record (forwarded as it was by some tool) is not its history.
          headers: {
            "trace-id": "abc",
            "x-twice": ["one", "two"],
            [RetryPolicy.headers.originalTopic]: "elsewhere",
            [RetryPolicy.headers.originalPartition]: "5",
            [RetryPolicy.headers.originalOffset]: "12345",
            [RetryPolicy.headers.originalTimestamp]: "1",
            [RetryPolicy.headers.attempt]: "99",
            [RetryPolicy.headers.firstFailureAt]: "1",
            [RetryPolicy.headers.consumerGroup]: "g"
          }
        }
      ])
      const startedAt = yield* Clock.currentTimeMillis
      yield* advanceWhile(
        Effect.map(InMemoryKafka.records("orders-dlq"), (dlq) => dlq.length === 0),
        "1 second"
      )
      const dlq = yield* InMemoryKafka.records("orders-dlq")
      assert.deepStrictEqual(attempts, [0, 1, 2, 3])
      for (const n of [1, 2, 3]) {
        assert.strictEqual((yield* InMemoryKafka.records(`orders-retry-${n}`)).length, 1, `one record in retry-${n}`)
      }
      assert.strictEqual(dlq.length, 1)
      const record = dlq[0] as KafkaClient.ConsumedRecord
      const h = (name: string) => text(record.headers[name])
      assert.strictEqual(text(record.key ?? undefined), "o-7")
      assert.deepStrictEqual(JSON.parse(text(record.value ?? undefined) ?? ""), { id: "o-7", amount: 42 })
      assert.strictEqual(h("trace-id"), "abc", "original headers are kept")
      assert.deepStrictEqual(
        (record.repeatedHeaders?.["x-twice"] ?? []).map((value) => text(value)),
        ["one", "two"],
        "a header that occurs twice is kept twice, in order"
      )
      assert.strictEqual(h(RetryPolicy.headers.originalTopic), "orders")
      assert.strictEqual(h(RetryPolicy.headers.originalPartition), String(produced?.partition))
      assert.strictEqual(h(RetryPolicy.headers.originalOffset), String(produced?.offset))
      assert.strictEqual(h(RetryPolicy.headers.originalTimestamp), String(startedAt))
      assert.strictEqual(h(RetryPolicy.headers.attempt), "4", "failed on the main topic and 3 retry topics")
      assert.strictEqual(h(RetryPolicy.headers.firstFailureAt), String(failedAt[0]))
      assert.strictEqual(h(RetryPolicy.headers.dueAt), undefined, "a dead letter is not due anywhere")
      assert.strictEqual(h(RetryPolicy.headers.errorTag), "PaymentDown")
      assert.strictEqual(h(RetryPolicy.headers.errorMessage), "payment service down for o-7")
      assert.strictEqual(h(RetryPolicy.headers.consumerGroup), "g")
      // The history as RetryPolicy reads it back.
      const history = RetryPolicy.historyOf(record)
      assert.isTrue(history._tag === "Some" && history.value.originalOffset === produced?.offset)
      yield* Fiber.interrupt(fiber)
    }).pipe(Effect.provide(setup()))
  )

  it.effect("a record that fails once, then succeeds in place, is processed once and never reaches the DLQ", () =>
    Effect.gen(function* () {
      let calls = 0
      const fiber = yield* Effect.forkChild(
        Processor.run([
          Processor.handler({
            topic: "orders",
            value: Order,
            handle: ({ value }) => (++calls === 1 ? Effect.fail(new PaymentDown({ id: value.id })) : Effect.void)
          })
        ])
      )
      yield* InMemoryKafka.produce("orders", [order("o-2")])
      const processor = yield* Processor.Processor
      yield* advanceUntil(() => calls >= 2, "10 millis")
      yield* TestClock.adjust("10 minutes")
      const stats = yield* processor.stats
      assert.strictEqual(calls, 2)
      assert.strictEqual(stats.done, 1)
      assert.strictEqual(stats.retriedInPlace, 1)
      assert.deepStrictEqual(stats.retried, {})
      assert.deepStrictEqual(stats.deadLettered, {})
      assert.deepStrictEqual(yield* InMemoryKafka.records("orders-retry-1"), [])
      assert.deepStrictEqual(yield* InMemoryKafka.records("orders-dlq"), [])
      yield* InMemoryKafka.awaitCommitted("g", "orders", 0, 1n).pipe(
        Effect.raceFirst(InMemoryKafka.awaitCommitted("g", "orders", 1, 1n))
      )
      yield* Fiber.interrupt(fiber)
    }).pipe(Effect.provide(setup({ inPlaceRetry: Schedule.max([Schedule.spaced("100 millis"), Schedule.recurs(2)]) })))
  )

  it.effect("fatal failures skip the ladder: Processor.Fatal, the fatal predicate, and every decoding failure", () =>
    Effect.gen(function* () {
      const handled: Array<string> = []
      const fiber = yield* Effect.forkChild(
        Processor.run([
          Processor.handler({
            topic: "orders",
            value: Order,
            handle: ({ value }): Effect.Effect<void, Processor.Fatal | PaymentDown> => {
              handled.push(value.id)
              if (value.id === "fatal") return Effect.fail(new Processor.Fatal({ reason: "unknown customer" }))
              if (value.id === "marked") return Effect.fail(new PaymentDown({ id: value.id }))
              return Effect.void
            },
            fatal: (error) => error._tag === "PaymentDown" && error.id === "marked"
          })
        ])
      )
      yield* InMemoryKafka.produce("orders", [
        { key: "k", value: "{not json" },
        { key: "k", value: JSON.stringify({ id: "x", amount: "ten" }) },
        { key: "k", value: new Uint8Array([0xc3, 0x28]) },
        { key: "k", value: null },
        { ...order("fatal"), key: "k" },
        { ...order("marked"), key: "k" },
        { ...order("fine"), key: "k" }
      ])
      const processor = yield* Processor.Processor
      yield* advanceUntil(() => handled.includes("fine"), "10 millis")
      const dlq = yield* InMemoryKafka.records("orders-dlq")
      assert.deepStrictEqual(
        dlq.map((record) => text(record.headers[RetryPolicy.headers.errorTag])),
        ["InvalidJson", "SchemaViolation", "InvalidUtf8", "NullValue", "Fatal", "PaymentDown"]
      )
      assert.isTrue(dlq.every((record) => text(record.headers[RetryPolicy.headers.attempt]) === "1"))
      assert.include(text(dlq[1]?.headers[RetryPolicy.headers.errorMessage]), "amount")
      assert.strictEqual(text(dlq[4]?.headers[RetryPolicy.headers.errorMessage]), "unknown customer")
      assert.deepStrictEqual(yield* InMemoryKafka.records("orders-retry-1"), [])
      assert.deepStrictEqual(handled, ["fatal", "marked", "fine"])
      const stats = yield* processor.stats
      assert.strictEqual(stats.done, 1)
      assert.strictEqual(
        Object.values(stats.deadLettered).reduce((a, b) => a + b, 0),
        6
      )
      yield* Fiber.interrupt(fiber)
    }).pipe(Effect.provide(setup({}, 1)))
  )

  it.effect("a record waiting in a retry topic holds up neither other retry partitions nor the main topic", () =>
    Effect.gen(function* () {
      const handled: Array<{ id: string; attempt: number; at: number }> = []
      const fiber = yield* Effect.forkChild(
        Processor.run([
          Processor.handler({
            topic: "orders",
            value: Order,
            handle: ({ value, attempt }) =>
              Effect.gen(function* () {
                handled.push({ id: value.id, attempt, at: yield* Clock.currentTimeMillis })
              })
          })
        ])
      )
      const now = yield* Clock.currentTimeMillis
      const waiting = (id: string, partition: number, dueAt: number) => ({
        ...order(id),
        partition,
        headers: retryHeaders("g", dueAt)
      })
      // Partition 0 of retry-1 waits 5 s (the topic's delay) for its head; partition 1's record is due in 1 s.
      yield* InMemoryKafka.produce("orders-retry-1", [waiting("late", 0, now + 5_000), waiting("soon", 1, now + 1_000)])
      yield* InMemoryKafka.produce("orders", [order("fresh")])
      yield* advanceUntil(() => handled.length >= 3, "100 millis")
      assert.deepStrictEqual(
        handled.map((h) => [h.id, h.attempt, h.at - now]),
        [
          ["fresh", 0, handled[0]?.at === undefined ? 0 : handled[0].at - now],
          ["soon", 1, 1_000],
          ["late", 1, 5_000]
        ]
      )
      assert.isTrue((handled[0]?.at ?? Infinity) - now < 1_000, "the main topic did not wait")
      yield* Fiber.interrupt(fiber)
    }).pipe(Effect.provide(setup()))
  )

  it.effect("records left in retry topics beyond a lowered retryMax are handled when due, then dead-lettered", () =>
    Effect.gen(function* () {
      const handled: Array<[string, number]> = []
      const fiber = yield* runOrders(({ value, attempt }) =>
        Effect.sync(() => handled.push([value.id, attempt])).pipe(
          Effect.andThen(value.id === "fails" ? Effect.fail(new PaymentDown({ id: value.id })) : Effect.void)
        )
      )
      const now = yield* Clock.currentTimeMillis
      // Written while the ladder had three topics; the processor now runs with one.
      yield* InMemoryKafka.produce("orders-retry-2", [{ ...order("succeeds"), headers: retryHeaders("g", now) }])
      yield* InMemoryKafka.produce("orders-retry-3", [{ ...order("fails"), headers: retryHeaders("g", now) }])
      yield* advanceUntil(() => handled.length >= 2, "100 millis", 1_000)
      assert.deepStrictEqual(
        handled.sort(([a], [b]) => a.localeCompare(b)),
        [
          ["fails", 3],
          ["succeeds", 2]
        ]
      )
      yield* advanceWhile(
        Effect.map(InMemoryKafka.records("orders-dlq"), (dead) => dead.length === 0),
        "100 millis",
        100
      )
      const dead = yield* InMemoryKafka.records("orders-dlq")
      assert.deepStrictEqual(
        dead.map((record) => text(record.key ?? undefined)),
        ["fails"],
        "a failure there goes to the DLQ, not further up"
      )
      yield* Fiber.interrupt(fiber)
    }).pipe(Effect.provide(setup({ retryMax: 1 }, 1)))
  )

  it.effect("readiness is down while a dead-letter send keeps failing, and up again once it goes through", () => {
    let refused = true
    return Effect.gen(function* () {
      const health = yield* Observability.Health
      const routing = "retry and dead-letter sends of g"
      const fiber = yield* runOrders(() => Effect.void)
      yield* advanceWhile(
        Effect.map(health.status, (status) => status.services["consumer g"] !== true),
        "10 millis",
        100
      )
      assert.isTrue((yield* health.status).services[routing], "ready at start")
      yield* InMemoryKafka.produce("orders", [{ key: "bad", value: "not json" }])
      yield* advanceWhile(
        Effect.map(health.status, (status) => status.services[routing] !== false),
        "100 millis",
        100
      )
      const stalled = yield* health.status
      assert.isFalse(stalled.services[routing], "down while the DLQ refuses")
      assert.isFalse(stalled.ready)
      assert.deepStrictEqual(yield* InMemoryKafka.records("orders-dlq"), [])
      refused = false
      yield* advanceWhile(
        Effect.map(InMemoryKafka.records("orders-dlq"), (dead) => dead.length === 0),
        "1 second",
        100
      )
      assert.strictEqual((yield* InMemoryKafka.records("orders-dlq")).length, 1)
      assert.isTrue((yield* health.status).services[routing], "up again")
      yield* Fiber.interrupt(fiber)
    }).pipe(
      Effect.provide(
        Processor.layer(options()).pipe(
          Layer.provideMerge(KafkaProducer.layer({ linger: Duration.zero, idempotent: false, acks: -1 })),
          Layer.provideMerge(refusingKafka((topic) => refused && topic === "orders-dlq", allTopics(2))),
          Layer.provideMerge(Observability.layerHealth)
        )
      )
    )
  })

  it.effect("a due-at beyond its retry topic's delay waits only that delay, not as long as it says", () =>
    Effect.gen(function* () {
      const handled: Array<number> = []
      const fiber = yield* runOrders(() =>
        Effect.flatMap(Clock.currentTimeMillis, (at) => Effect.sync(() => handled.push(at)))
      )
      const now = yield* Clock.currentTimeMillis
      // A year ahead: a garbled header, or a writer whose clock is far ahead. The topic's delay is 5 s.
      yield* InMemoryKafka.produce("orders-retry-1", [
        {
          ...order("far"),
          headers: retryHeaders("g", now + 365 * 24 * 3600_000)
        }
      ])
      yield* advanceUntil(() => handled.length >= 1, "100 millis", 100)
      assert.strictEqual((handled[0] ?? Number.NaN) - now, 5_000)
      yield* Fiber.interrupt(fiber)
    }).pipe(Effect.provide(setup()))
  )

  it.effect("a handler that throws before returning an effect climbs the ladder to the DLQ as a Defect", () =>
    Effect.gen(function* () {
      const attempts: Array<number> = []
      const fiber = yield* runOrders(({ attempt }) => {
        attempts.push(attempt)
        throw new Error("a bug in ordinary code")
      })
      yield* InMemoryKafka.produce("orders", [order("thrower")])
      yield* advanceUntil(() => attempts.length >= 4, "1 second", 1_000)
      yield* advanceUntil(() => false, "100 millis", 20)
      assert.deepStrictEqual(attempts, [0, 1, 2, 3])
      const [dead] = yield* InMemoryKafka.records("orders-dlq")
      assert.strictEqual(text(dead?.headers[RetryPolicy.headers.errorTag]), "Defect")
      assert.include(text(dead?.headers[RetryPolicy.headers.errorMessage]), "a bug in ordinary code")
      yield* Fiber.interrupt(fiber)
    }).pipe(Effect.provide(setup()))
  )

  it.effect("a retry record's attempt is its retry topic's, and one without a group header is handled, not lost", () =>
    Effect.gen(function* () {
      const seen: Array<[string, number]> = []
      const fiber = yield* runOrders(({ value, attempt }) =>
        Effect.gen(function* () {
          seen.push([value.id, attempt])
          if (value.id === "hostile") return yield* new PaymentDown({ id: value.id })
        })
      )
      const { [RetryPolicy.headers.consumerGroup]: _group, ...withoutGroup } = retryHeaders("g")
      yield* InMemoryKafka.produce("orders-retry-1", [
        { ...order("no-group"), partition: 0, headers: withoutGroup },
        { ...order("hostile"), partition: 1, headers: { ...retryHeaders("g"), [RetryPolicy.headers.attempt]: "-5" } }
      ])
      yield* advanceUntil(() => seen.length >= 2, "100 millis", 200)
      yield* advanceUntil(() => false, "100 millis", 20)
      assert.sameDeepMembers(seen.slice(0, 2), [
        ["no-group", 1],
        ["hostile", 1]
      ])
      // The failed one went up the ladder to retry-2, not to "orders-retry--4".
      const [next] = yield* InMemoryKafka.records("orders-retry-2")
      assert.strictEqual(text(next?.headers[RetryPolicy.headers.attempt]), "2")
      yield* Fiber.interrupt(fiber)
    }).pipe(Effect.provide(setup()))
  )

  it.effect("retry records of another consumer group are left alone, also with a garbled history", () =>
    Effect.gen(function* () {
      let calls = 0
      const fiber = yield* Effect.forkChild(
        Processor.run([Processor.handler({ topic: "orders", value: Order, handle: () => Effect.sync(() => calls++) })])
      )
      yield* InMemoryKafka.produce("orders-retry-1", [
        { ...order("theirs"), partition: 0, headers: retryHeaders("another-group") },
        {
          ...order("theirs, garbled"),
          partition: 1,
          headers: { ...retryHeaders("another-group"), [RetryPolicy.headers.originalOffset]: "?" }
        }
      ])
      const processor = yield* Processor.Processor
      yield* advanceWhile(
        Effect.map(processor.stats, (stats) => stats.skipped < 2),
        "100 millis",
        1_000
      )
      // The skipped records are finished like any other: committed, not redelivered.
      yield* advanceUntil(() => false, "100 millis", 20)
      const broker = yield* InMemoryKafka.InMemoryBroker
      const committed = yield* Effect.forEach([0, 1], (partition) =>
        broker.committed("g-retry-1", "orders-retry-1", partition)
      )
      assert.deepStrictEqual(committed, [1n, 1n])
      const stats = yield* processor.stats
      assert.strictEqual(calls, 0)
      assert.strictEqual(stats.skipped, 2)
      assert.deepStrictEqual(yield* InMemoryKafka.records("orders-dlq"), [], "not dead-lettered by this group")
      const processed = (topic: string, outcome: string) =>
        Effect.map(
          Metric.value(Metric.withAttributes(Metrics.recordsProcessed, { topic, outcome })),
          (state) => state.count
        )
      assert.strictEqual(yield* processed("orders-retry-1", "skipped"), 2, "skipped records are counted")
      // Every outcome of a handled topic exists from the start, at 0, so that its first increase shows.
      const dead = yield* Metric.snapshot
      assert.isTrue(
        dead.some(
          (metric) =>
            metric.id === "records_processed_total" &&
            metric.attributes?.topic === "orders" &&
            metric.attributes?.outcome === "dead_lettered"
        ),
        "orders' dead_lettered series exists"
      )
      assert.strictEqual(yield* processed("orders", "dead_lettered"), 0)
      yield* Fiber.interrupt(fiber)
    }).pipe(
      Effect.provide(setup()),
      // A registry of its own: the counts of the tests before would be in the global one.
      Effect.provideService(Metric.MetricRegistry, new Map())
    )
  )

  it.effect(
    "missing topics fail start-up naming them; with createTopics they are made with the main topic's count",
    () =>
      Effect.gen(function* () {
        const handlers = [Processor.handler({ topic: "orders", value: Order, handle: () => Effect.void })]
        const missing = yield* Effect.exit(
          Processor.run(handlers).pipe(
            Effect.provide(
              Processor.layer(options()).pipe(
                Layer.provideMerge(KafkaProducer.layer({ linger: Duration.zero, idempotent: false })),
                Layer.provideMerge(InMemoryKafka.layer({ topics: [{ topic: "orders", partitions: 3 }] }))
              )
            )
          )
        )
        assert.isTrue(Exit.isFailure(missing))
        assert.include(
          String(Exit.isFailure(missing) ? missing.cause : ""),
          "topics missing: orders-retry-1, orders-retry-2, orders-retry-3, orders-dlq"
        )

        const created = Effect.gen(function* () {
          const fiber = yield* Effect.forkChild(Processor.run(handlers))
          yield* advanceUntil(() => false, "100 millis", 10)
          const client = yield* KafkaClient.KafkaClient
          const counts = yield* Effect.forEach(["orders-retry-1", "orders-retry-3", "orders-dlq"], (topic) =>
            Effect.map(client.admin.partitionCount(topic), (partitions) => [topic, partitions])
          )
          yield* Fiber.interrupt(fiber)
          return counts
        })
        const topics = yield* created.pipe(
          Effect.provide(
            Processor.layer(options({ createTopics: true })).pipe(
              Layer.provideMerge(KafkaProducer.layer({ linger: Duration.zero, idempotent: false })),
              Layer.provideMerge(InMemoryKafka.layer({ topics: [{ topic: "orders", partitions: 3 }] }))
            )
          )
        )
        assert.deepStrictEqual(topics, [
          ["orders-retry-1", 3],
          ["orders-retry-3", 3],
          ["orders-dlq", 3]
        ])
      })
  )
})

describe("Replay", () => {
  const deadLetter = (id: string, tag: string, originalTopic = "orders", consumerGroup = "g") => {
    const source: KafkaClient.ConsumedRecord = {
      topic: originalTopic,
      partition: 0,
      offset: 7n,
      key: new TextEncoder().encode(id),
      value: new TextEncoder().encode(JSON.stringify({ id, amount: 1 })),
      headers: { "trace-id": new TextEncoder().encode(`t-${id}`) },
      timestamp: 0
    }
    const policy = RetryPolicy.make({ retryTopicPrefix: "orders-retry", retryMax: 3, dlqTopic: "orders-dlq" })
    const hop = RetryPolicy.nextHop(
      policy,
      source,
      { tag, message: "boom", fatal: true },
      { now: 0, consumerGroup, history: Option.none() }
    )
    return { key: hop.key, value: hop.value, headers: hop.headers, partition: 0 }
  }

  const layer = KafkaProducer.layer({ linger: Duration.zero, idempotent: false }).pipe(
    Layer.provideMerge(InMemoryKafka.layer({ topics: [...allTopics(2), { topic: "payments", partitions: 1 }] }))
  )

  const refusing = (topic: string) =>
    KafkaProducer.layer({ linger: Duration.zero, idempotent: false }).pipe(
      Layer.provideMerge(refusingKafka((to) => to === topic, [...allTopics(2), { topic: "payments", partitions: 1 }]))
    )

  const replay = (overrides: Partial<Replay.ReplayOptions>) =>
    Effect.gen(function* () {
      const fiber = yield* Effect.forkChild(
        Replay.replay({ dlqTopic: "orders-dlq", groupId: "g", dryRun: false, ...overrides })
      )
      yield* advanceWhile(
        Effect.map(Fiber.await(fiber).pipe(Effect.timeoutOption(0)), (exit) => exit._tag === "None"),
        "100 millis"
      )
      return yield* Fiber.join(fiber)
    })

  it.effect("replays matching dead letters to their original topic, without the history headers", () =>
    Effect.gen(function* () {
      yield* InMemoryKafka.produce("orders-dlq", [deadLetter("a", "Timeout")])
      yield* TestClock.adjust("1 hour")
      const since = yield* Clock.currentTimeMillis
      yield* InMemoryKafka.produce("orders-dlq", [
        deadLetter("b", "Timeout"),
        deadLetter("c", "SchemaViolation"),
        deadLetter("d", "Timeout", "payments"),
        deadLetter("e", "Timeout")
      ])

      const dry = yield* replay({ errorTags: ["Timeout"], since, dryRun: true })
      assert.deepStrictEqual(dry, {
        scanned: 5,
        matched: 3,
        replayed: 0,
        unreadable: 0,
        otherGroups: 0,
        topicMissing: {},
        withoutValue: 0,
        byTopic: { orders: 2, payments: 1 },
        byErrorTag: { Timeout: 3 }
      })
      assert.deepStrictEqual(yield* InMemoryKafka.records("orders"), [], "a dry run sends nothing")

      const limited = yield* replay({ errorTags: ["Timeout"], originalTopics: ["orders"], since, max: 1 })
      assert.strictEqual(limited.matched, 1)
      assert.strictEqual(limited.replayed, 1)
      const orders = yield* InMemoryKafka.records("orders")
      assert.deepStrictEqual(
        orders.map((record) => text(record.key ?? undefined)),
        ["b"]
      )
      const replayed = orders[0] as KafkaClient.ConsumedRecord
      // The history headers are gone; the replay's span is the replayed record's trace parent.
      assert.deepStrictEqual(Object.keys(replayed.headers).sort(), [
        "kafka-effect-replayed-from",
        "trace-id",
        "traceparent"
      ])
      assert.strictEqual(text(replayed.headers["trace-id"]), "t-b")
      assert.strictEqual(text(replayed.headers[Replay.replayedFromHeader]), "orders-dlq/0/1")
      assert.deepStrictEqual(JSON.parse(text(replayed.value ?? undefined) ?? ""), { id: "b", amount: 1 })

      const until = yield* replay({ until: since })
      assert.deepStrictEqual([until.matched, until.replayed], [1, 1])
      assert.deepStrictEqual(
        (yield* InMemoryKafka.records("orders")).map((record) => text(record.key ?? undefined)),
        ["b", "a"]
      )
    }).pipe(Effect.provide(layer))
  )

  it.effect("dead letters without a value (dropped as too large, or null) are left alone, not sent as tombstones", () =>
    Effect.gen(function* () {
      const policy = RetryPolicy.make({ retryTopicPrefix: "orders-retry", retryMax: 3, dlqTopic: "orders-dlq" })
      const dropped = RetryPolicy.withoutValue(policy, { topic: "orders-dlq", ...deadLetter("big", "Timeout") })
      yield* InMemoryKafka.produce("orders-dlq", [
        { key: dropped.key, value: dropped.value, headers: dropped.headers ?? {}, partition: 0 },
        { ...deadLetter("null", "NullValue"), value: null },
        deadLetter("kept", "Timeout")
      ])
      const summary = yield* replay({})
      assert.deepStrictEqual([summary.scanned, summary.matched, summary.replayed, summary.withoutValue], [3, 1, 1, 2])
      assert.deepStrictEqual(
        (yield* InMemoryKafka.records("orders")).map((record) => text(record.key ?? undefined)),
        ["kept"]
      )
    }).pipe(Effect.provide(layer))
  )

  it.effect("only this group's dead letters are replayed; those of a deleted topic are counted and left alone", () =>
    Effect.gen(function* () {
      const anyone = deadLetter("anyone", "Timeout")
      const { [RetryPolicy.headers.consumerGroup]: _group, ...withoutGroup } = anyone.headers ?? {}
      yield* InMemoryKafka.produce("orders-dlq", [
        deadLetter("mine", "Timeout"),
        deadLetter("theirs", "Timeout", "orders", "billing"),
        { ...anyone, headers: withoutGroup },
        deadLetter("lost", "Timeout", "gone")
      ])
      const dry = yield* replay({ dryRun: true })
      assert.deepStrictEqual(
        [dry.scanned, dry.matched, dry.otherGroups, dry.topicMissing],
        [4, 2, 1, { gone: 1 }],
        "the dry run tells of the deleted topic too"
      )
      const summary = yield* replay({})
      assert.deepStrictEqual([summary.matched, summary.replayed, summary.otherGroups], [2, 2, 1])
      assert.deepStrictEqual(
        (yield* InMemoryKafka.records("orders")).map((record) => text(record.key ?? undefined)).sort(),
        ["anyone", "mine"],
        "another group's dead letter stays where it is; one without a group header is anyone's"
      )
      const everyone = yield* replay({ allGroups: true, dryRun: true })
      assert.deepStrictEqual([everyone.matched, everyone.otherGroups], [3, 0])
    }).pipe(Effect.provide(layer))
  )

  it.effect("a replay that fails partway says exactly what it re-published", () =>
    Effect.gen(function* () {
      // Dead letters of "orders" on both DLQ partitions, and one on partition 1 whose original topic refuses sends.
      yield* InMemoryKafka.produce("orders-dlq", [
        deadLetter("a", "Timeout"),
        deadLetter("b", "Timeout"),
        { ...deadLetter("c", "Timeout"), partition: 1 },
        { ...deadLetter("refused", "Timeout", "payments"), partition: 1 }
      ])
      const warnings: Array<string> = []
      const logger = Logger.make(({ logLevel, message }) => {
        if (logLevel === "Warn") warnings.push((Array.isArray(message) ? message : [message]).map(String).join(" "))
      })
      const exit = yield* Effect.exit(replay({})).pipe(Effect.provide(Logger.layer([logger])))
      assert.isTrue(Exit.isFailure(exit), "the refused send fails the replay")
      const line = warnings.find((warning) => warning.startsWith("replay stopped before its end"))
      assert.isDefined(line, warnings.join("\n"))
      const logged = JSON.parse(line?.replace(/^[^{]*/, "") ?? "{}")
      const written = yield* InMemoryKafka.records("orders")
      assert.strictEqual(logged.replayed, written.length, "replayed counts what was written, no more, no less")
    }).pipe(Effect.provide(refusing("payments")))
  )

  it.effect("an empty dead-letter topic replays nothing", () =>
    Effect.gen(function* () {
      const summary = yield* Replay.replay({ dlqTopic: "orders-dlq", groupId: "g", dryRun: false })
      assert.strictEqual(summary.scanned, 0)
    }).pipe(Effect.provide(layer))
  )
})
