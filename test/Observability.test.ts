import { assert, describe, it } from "@effect/vitest"
import { Duration, Effect, Fiber, Layer, Option, Schedule, Schema, Tracer } from "effect"
import { TestClock } from "effect/testing"
import * as InMemoryKafka from "../src/InMemoryKafka.ts"
import * as KafkaProducer from "../src/KafkaProducer.ts"
import * as Observability from "../src/Observability.ts"
import * as Processor from "../src/Processor.ts"

const Order = Schema.Struct({ id: Schema.String })

/** A tracer that keeps every span it makes (Effect's own spans), to inspect parents afterwards. */
const collecting = () => {
  const spans: Array<Tracer.Span> = []
  const tracer = Tracer.make({
    span(options) {
      const span = Tracer.nativeTracer.span(options)
      spans.push(span)
      return span
    }
  })
  return { spans, layer: Layer.succeed(Tracer.Tracer, tracer) }
}

/** The span ids from `span` up through its parents (external parents included). */
const ancestry = (span: Tracer.AnySpan): Array<string> => {
  const ids = [span.spanId]
  let current: Tracer.AnySpan = span
  while (current._tag === "Span" && Option.isSome(current.parent)) {
    current = current.parent.value
    ids.push(current.spanId)
  }
  return ids
}

const setup = Processor.layer({
  consumer: {
    groupId: "g",
    workers: 2,
    maxInFlight: 100,
    fromBeginning: true,
    commitInterval: Duration.millis(100),
    shutdownTimeout: Duration.seconds(1)
  },
  retryTopicPrefix: "orders-retry",
  retryMax: 1,
  retryDelays: [Duration.seconds(1)],
  dlqTopic: "orders-dlq",
  inPlaceRetry: Schedule.recurs(0)
}).pipe(
  Layer.provideMerge(KafkaProducer.layer({ linger: Duration.zero, idempotent: false })),
  Layer.provideMerge(
    InMemoryKafka.layer({
      topics: ["orders", "orders-retry-1", "orders-dlq"].map((topic) => ({ topic, partitions: 2 }))
    })
  )
)

describe("Observability", () => {
  it.effect("tracing: a handler's span has the producer's span as an ancestor, also after a retry hop", () => {
    const { spans, layer } = collecting()
    return Effect.gen(function* () {
      const handled: Array<{ attempt: number; span: Tracer.Span }> = []
      const fiber = yield* Effect.forkChild(
        Processor.run([
          Processor.handler({
            topic: "orders",
            value: Order,
            handle: ({ attempt }) =>
              Effect.gen(function* () {
                handled.push({ attempt, span: yield* Effect.currentSpan })
                if (attempt === 0) return yield* Effect.fail(new Error("first try fails"))
              })
          })
        ])
      )
      const publish = yield* KafkaProducer.send({
        topic: "orders",
        key: "o-1",
        value: JSON.stringify({ id: "o-1" })
      }).pipe(Effect.andThen(Effect.currentSpan), Effect.withSpan("publish order"))
      for (let i = 0; i < 100 && handled.length < 2; i++) yield* TestClock.adjust("100 millis")
      assert.deepStrictEqual(
        handled.map((h) => h.attempt),
        [0, 1]
      )
      for (const { span } of handled) {
        assert.include(ancestry(span), publish.spanId, `${span.name} descends from the producer's span`)
        assert.strictEqual(span.traceId, publish.traceId)
        assert.strictEqual(span.kind, "consumer")
      }
      // The first try's span says it was retried, and why; the second's that it was done.
      assert.deepStrictEqual(
        handled.map(({ span }) => span.attributes.get(Processor.outcomeAttribute)),
        ["retried", "done"]
      )
      assert.isDefined(handled[0]?.span.attributes.get("error.type"))
      const produceSpans = spans.filter((span) => span.name === "kafka.produce")
      assert.isAbove(produceSpans.length, 0, "a span per produced batch")
      assert.isTrue(produceSpans.every((span) => span.kind === "producer"))
      assert.isTrue(
        produceSpans.some((span) => span.links.some((link) => link.span.spanId === publish.spanId)),
        "the request's span links to the span of the send it carried"
      )
      yield* Fiber.interrupt(fiber)
    }).pipe(Effect.provide(setup), Effect.provide(layer))
  })

  it.effect("readiness: ready once every reporting service is ready, not before, and not with none; why not", () =>
    Effect.gen(function* () {
      const health = yield* Observability.Health
      assert.isFalse((yield* health.status).ready, "nothing reported")
      yield* Observability.report("producer", true)
      yield* Observability.report("consumer g", false, "no answer from the brokers for 31 s")
      assert.deepStrictEqual(yield* health.status, {
        ready: false,
        services: { producer: true, "consumer g": false },
        reasons: { "consumer g": "no answer from the brokers for 31 s" }
      })
      yield* Observability.report("consumer g", true)
      assert.deepStrictEqual(yield* health.status, {
        ready: true,
        services: { producer: true, "consumer g": true },
        reasons: {}
      })
    }).pipe(Effect.provide(Observability.layerHealth))
  )
})
