/**
 * A producer as its own OS process, for the cluster's fault tests: configured by the environment like the programs
 * (KAFKA_PRODUCER_TOPIC, acks, idempotence, retries), it sends COUNT events (src/Event.ts) with ids `e-0`…`e-<COUNT-1>`, keyed
 * `k-<i mod 100>`, from CONCURRENCY fibers, and prints one line per record as its outcome is known:
 * `acked <id> <partition> <offset>` or `failed <id> <reason>`; then `done <sends begun>`. Lines are written
 * synchronously, so a line printed is an outcome reported, even if the process is killed right after.
 *
 * RATE=n paces the sends at n events/s (0, the default: as fast as they go). With UNTIL_STDIN_ENDS=true it stops
 * beginning sends once its stdin ends (the test says when), finishes the ones begun, and prints `done`: a producer
 * that runs for as long as a fault scenario lasts, whatever the machine's speed.
 */
import { Clock, Deferred, Effect, Layer } from "effect"
import * as KafkaClient from "../../src/KafkaClient.ts"
import * as KafkaProducer from "../../src/KafkaProducer.ts"
import * as Observability from "../../src/Observability.ts"
import { run } from "../../src/programs/main.ts"
import { writeLine } from "./writeLine.ts"

const count = Number(process.env.COUNT ?? "1000")
const concurrency = Number(process.env.CONCURRENCY ?? "64")
const topic = process.env.KAFKA_PRODUCER_TOPIC ?? "events"
const rate = Number(process.env.RATE ?? "0")
const untilStdinEnds = process.env.UNTIL_STDIN_ENDS === "true"
let begun = 0

/** Event `i`, as the consumer program's example handler takes it (src/Event.ts). */
const event = (i: number) =>
  JSON.stringify({
    id: `e-${i}`,
    type: "order.created",
    source: "cluster-test",
    timestamp: "2026-12-06T12:00:00.000Z",
    subject: `k-${i % 100}`,
    payload: { n: i }
  })

const program = Effect.gen(function* () {
  const stdinEnded = yield* Deferred.make<void>()
  if (untilStdinEnds) {
    process.stdin.on("end", () => Deferred.doneUnsafe(stdinEnded, Effect.void))
    process.stdin.resume()
  }
  const startedAt = yield* Clock.currentTimeMillis
  let next = 0
  // CONCURRENCY fibers, each taking the next event until there are none or stdin ended.
  const sender = Effect.gen(function* () {
    while (next < count && !(yield* Deferred.isDone(stdinEnded))) {
      const i = next++
      if (rate > 0) {
        const due = startedAt + (i * 1000) / rate
        const now = yield* Clock.currentTimeMillis
        if (due > now) yield* Effect.race(Effect.sleep(due - now), Deferred.await(stdinEnded))
        if (yield* Deferred.isDone(stdinEnded)) return
      }
      begun++
      yield* KafkaProducer.send({ topic, key: `k-${i % 100}`, value: event(i) }).pipe(
        Effect.matchCause({
          onSuccess: ({ partition, offset }) => writeLine(`acked e-${i} ${partition} ${offset}`),
          onFailure: (cause) => writeLine(`failed e-${i} ${String(cause).split("\n")[0]}`)
        })
      )
    }
  })
  yield* Effect.all(
    Array.from({ length: concurrency }, () => sender),
    { concurrency: "unbounded", discard: true }
  )
}).pipe(
  Effect.andThen(Effect.sync(() => writeLine(`done ${begun}`))),
  Effect.provide(KafkaProducer.layerConfig.pipe(Layer.provideMerge(KafkaClient.layerConfig))),
  Effect.provide(Observability.layerLoggerConfig)
)

run(program)
