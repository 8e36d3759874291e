/**
 * A producer as its own OS process, for the cluster's fault tests: configured by the environment like the programs
 * (KAFKA_PRODUCER_TOPIC, acks, idempotence, retries), it sends COUNT events (src/Event.ts) with ids `e-0`…`e-<COUNT-1>`, keyed
 * `k-<i mod 100>`, from CONCURRENCY fibers, and prints one line per record as its outcome is known:
 * `acked <id> <partition> <offset>` or `failed <id> <reason>`; then `done`. Lines are written synchronously, so a
 * line printed is an outcome reported, even if the process is killed right after.
 */
import { Effect, Layer } from "effect"
import * as KafkaClient from "../../src/KafkaClient.ts"
import * as KafkaProducer from "../../src/KafkaProducer.ts"
import * as Observability from "../../src/Observability.ts"
import { run } from "../../src/programs/main.ts"
import { writeLine } from "./writeLine.ts"

const count = Number(process.env.COUNT ?? "1000")
const concurrency = Number(process.env.CONCURRENCY ?? "64")
const topic = process.env.KAFKA_PRODUCER_TOPIC ?? "events"

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

const program = Effect.forEach(
  Array.from({ length: count }, (_, i) => i),
  (i) =>
    KafkaProducer.send({ topic, key: `k-${i % 100}`, value: event(i) }).pipe(
      Effect.matchCause({
        onSuccess: ({ partition, offset }) => writeLine(`acked e-${i} ${partition} ${offset}`),
        onFailure: (cause) => writeLine(`failed e-${i} ${String(cause).split("\n")[0]}`)
      })
    ),
  { concurrency, discard: true }
).pipe(
  Effect.andThen(Effect.sync(() => writeLine("done"))),
  Effect.provide(KafkaProducer.layerConfig.pipe(Layer.provideMerge(KafkaClient.layerConfig))),
  Effect.provide(Observability.layerLoggerConfig)
)

run(program)
