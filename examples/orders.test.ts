/**
 * The example app on the in-memory broker under TestClock: what a test of your own handlers looks like.
 */
import { assert, describe, it } from "@effect/vitest"
import { Clock, Duration, Effect, Fiber, Layer } from "effect"
import { TestClock } from "effect/testing"
import * as InMemoryKafka from "kafka-effect/InMemoryKafka"
import * as KafkaProducer from "kafka-effect/KafkaProducer"
import * as Processor from "kafka-effect/Processor"
import * as RetryPolicy from "kafka-effect/RetryPolicy"
import { handlers, main, Orders } from "./orders.ts"

const TestLive = Processor.layer({
  consumer: {
    groupId: "billing",
    workers: 4,
    maxInFlight: 100,
    fromBeginning: true,
    commitInterval: Duration.millis(100),
    shutdownTimeout: Duration.seconds(5)
  },
  retryTopicPrefix: "orders-retry",
  retryMax: 2,
  dlqTopic: "orders-dlq",
  createTopics: true
}).pipe(Layer.provideMerge(KafkaProducer.layer({ linger: Duration.zero })), Layer.provideMerge(InMemoryKafka.layer()))

describe("the orders example", () => {
  it.effect(
    "orders are charged in order per customer; a declined one goes to the dead-letter topic with its reason",
    () =>
      Effect.gen(function* () {
        const app = yield* Effect.forkChild(main)
        const processor = yield* Processor.Processor
        while ((yield* processor.stats).done < 2) yield* TestClock.adjust("100 millis")
        const deadLetters = yield* InMemoryKafka.records("orders-dlq")
        assert.strictEqual(deadLetters.length, 1)
        const reason = new TextDecoder().decode(deadLetters[0]?.headers[RetryPolicy.headers.errorTag])
        assert.strictEqual(reason, "PaymentDeclined")
        assert.deepStrictEqual((yield* processor.stats).deadLettered, { PaymentDeclined: 1 })
        yield* Fiber.interrupt(app)
      }).pipe(Effect.provide(TestLive))
  )

  it.effect("an order that keeps failing climbs the retry topics, each after its delay, then is dead-lettered", () =>
    Effect.gen(function* () {
      const processor = yield* Processor.Processor
      yield* processor.ensureTopics(handlers)
      const app = yield* Effect.forkChild(processor.run(handlers))
      yield* Orders.send({ id: "o-9", customer: "linus", amount: -1 }, { key: "linus" })
      const waitFor = <E, R>(done: () => Effect.Effect<boolean, E, R>) =>
        Effect.gen(function* () {
          while (!(yield* done())) yield* TestClock.adjust("100 millis")
        })
      const hops = Effect.map(processor.stats, (stats) => stats.retried)
      yield* waitFor(() => Effect.map(hops, (retried) => retried["orders-retry-1"] === 1))
      const start = yield* Clock.currentTimeMillis
      yield* waitFor(() => Effect.map(hops, (retried) => retried["orders-retry-2"] === 1))
      assert.isAtLeast((yield* Clock.currentTimeMillis) - start, 5_000, "retry-1 waits 5 s")
      yield* waitFor(() => Effect.map(InMemoryKafka.records("orders-dlq"), (records) => records.length === 1))
      assert.isAtLeast((yield* Clock.currentTimeMillis) - start, 35_000, "then retry-2 waits 30 s")
      yield* Fiber.interrupt(app)
    }).pipe(Effect.provide(TestLive))
  )
})
