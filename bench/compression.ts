/**
 * `npm run bench:compression`: our producer and consumer with each codec against `none`, on one broker in one run
 * (the test broker, started here unless KAFKA_BROKERS names one). Prints the figures and writes them to
 * bench/results/compression.json.
 *
 * Each codec: the producer `sendAll`s 100,000 JSON events of about 1 KiB (text of a few hundred distinct words, so
 * that the codecs have something to find, as in real events; not one repeated byte) to a fresh topic of 6
 * partitions, with acks=all and idempotence; then a consumer with a handler that does nothing reads them back. The
 * codecs run in turn, three rounds, and each figure is the median of its rounds. `size` is the bytes of one
 * 500-record batch's records after the codec (the producer's default batch size), for the compression ratio.
 */
import * as Fs from "node:fs"
import * as Path from "node:path"
import { Deferred, Duration, Effect, Exit, Fiber, Layer, Scope } from "effect"
import { Kafka, logLevel } from "kafkajs"
import * as Broker from "../scripts/kafka/broker.ts"
import { codecs } from "../src/internal/codecs.ts"
import type * as KafkaConfig from "../src/KafkaConfig.ts"
import * as KafkaConsumer from "../src/KafkaConsumer.ts"
import * as KafkaProducer from "../src/KafkaProducer.ts"
import { clientLayer } from "./support.ts"

const here = import.meta.dirname
const stamp = () => `${Date.now()}-${Math.random().toString(16).slice(2, 8)}`
const records = 100_000
const rounds = 3
const compressions: ReadonlyArray<KafkaConfig.Compression> = ["none", "gzip", "snappy", "lz4", "zstd"]

// A vocabulary and a seeded generator: every run writes the same events.
const words = Array.from({ length: 400 }, (_, i) => `w${((i * 7919) % 4001).toString(36)}${"aeiou"[i % 5]}`)
let seed = 42
const next = () => {
  seed = (seed * 1103515245 + 12345) & 0x7fffffff
  return seed
}
const event = (i: number) => {
  const text: Array<string> = []
  let length = 0
  while (length < 800) {
    const word = words[next() % words.length] as string
    text.push(word)
    length += word.length + 1
  }
  return JSON.stringify({
    id: `evt-${i}`,
    type: "order.created",
    source: "bench",
    timestamp: new Date(1_796_000_000_000 + i * 10).toISOString(),
    subject: `entity-${i % 1000}`,
    payload: { sequence: i, amount: next() % 100_000, note: text.join(" ") }
  })
}
const values = Array.from({ length: records }, (_, i) => event(i))

const createTopic = async (brokers: string, topic: string) => {
  const admin = new Kafka({ brokers: brokers.split(","), logLevel: logLevel.NOTHING }).admin()
  await admin.connect()
  await admin.createTopics({ topics: [{ topic, numPartitions: 6 }], waitForLeaders: true })
  await admin.disconnect()
}

const produce = (brokers: string, topic: string, compression: KafkaConfig.Compression) =>
  Effect.gen(function* () {
    const producer = yield* KafkaProducer.KafkaProducer
    const started = performance.now()
    yield* producer.sendAll(values.map((value, i) => ({ topic, key: `entity-${i % 1000}`, value })))
    return (performance.now() - started) / 1000
  }).pipe(
    Effect.scoped,
    Effect.provide(KafkaProducer.layer({ topic, compression }).pipe(Layer.provide(clientLayer(brokers))))
  )

const consume = (brokers: string, topic: string) =>
  Effect.gen(function* () {
    const consumer = yield* KafkaConsumer.make({
      groupId: `bench-${stamp()}`,
      topics: [topic],
      workers: 8,
      maxInFlight: 10_000,
      fromBeginning: true,
      commitInterval: Duration.seconds(1),
      shutdownTimeout: Duration.seconds(5),
      fetchMaxBytes: 10 * 1024 * 1024
    })
    let handled = 0
    const done = yield* Deferred.make<void>()
    const started = performance.now()
    const fiber = yield* Effect.forkChild(
      consumer.run(() =>
        Effect.sync(() => {
          if (++handled === records) Deferred.doneUnsafe(done, Effect.void)
        })
      )
    )
    yield* Deferred.await(done)
    const seconds = (performance.now() - started) / 1000
    yield* Fiber.interrupt(fiber)
    return seconds
  }).pipe(Effect.scoped, Effect.provide(clientLayer(brokers)))

const median = (xs: ReadonlyArray<number>) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] ?? 0

const batchBytes = (compression: KafkaConfig.Compression) =>
  Effect.promise(async () => {
    const batch = Buffer.from(values.slice(0, 500).join(""))
    return compression === "none" ? batch.length : (await codecs[compression].compress(batch)).length
  })

const program = Effect.gen(function* () {
  const scope = yield* Scope.make()
  const brokers =
    process.env.KAFKA_BROKERS ?? (yield* Broker.acquire({ jvm: "server" }).pipe(Scope.provide(scope))).brokers
  const figures = new Map<KafkaConfig.Compression, { produce: Array<number>; consume: Array<number> }>()
  for (const compression of compressions) figures.set(compression, { produce: [], consume: [] })
  for (let round = 0; round < rounds; round++) {
    for (const compression of compressions) {
      const topic = `bench-compression-${compression}-${stamp()}`
      yield* Effect.promise(() => createTopic(brokers, topic))
      const produced = yield* produce(brokers, topic, compression)
      const consumed = yield* consume(brokers, topic)
      const mine = figures.get(compression)
      mine?.produce.push(Math.round(records / produced))
      mine?.consume.push(Math.round(records / consumed))
      yield* Effect.sync(() =>
        process.stdout.write(
          `round ${round + 1} ${compression.padEnd(6)} produce ${Math.round(records / produced)}/s, consume ${Math.round(records / consumed)}/s\n`
        )
      )
    }
  }
  const none = figures.get("none") as { produce: Array<number>; consume: Array<number> }
  const rows = []
  for (const compression of compressions) {
    const mine = figures.get(compression) as { produce: Array<number>; consume: Array<number> }
    rows.push({
      compression,
      producePerSecond: median(mine.produce),
      consumePerSecond: median(mine.consume),
      produceOverNone: Number((median(mine.produce) / median(none.produce)).toFixed(2)),
      consumeOverNone: Number((median(mine.consume) / median(none.consume)).toFixed(2)),
      batchBytes: yield* batchBytes(compression),
      rounds: mine
    })
  }
  const result = {
    date: new Date().toISOString(),
    node: process.version,
    broker: `Apache Kafka ${Broker.kafkaVersion}, one node`,
    records,
    rows
  }
  Fs.mkdirSync(Path.join(here, "results"), { recursive: true })
  Fs.writeFileSync(Path.join(here, "results", "compression.json"), `${JSON.stringify(result, null, 2)}\n`)
  process.stdout.write(
    `\n${"codec".padEnd(8)}${"produce/s".padStart(12)}${"× none".padStart(9)}${"consume/s".padStart(12)}${"× none".padStart(9)}${"500-record batch".padStart(19)}\n`
  )
  for (const row of rows) {
    process.stdout.write(
      `${row.compression.padEnd(8)}${String(row.producePerSecond).padStart(12)}${row.produceOverNone.toFixed(2).padStart(9)}${String(row.consumePerSecond).padStart(12)}${row.consumeOverNone.toFixed(2).padStart(9)}${`${row.batchBytes} B`.padStart(19)}\n`
    )
  }
  yield* Scope.close(scope, Exit.void)
})

Effect.runPromise(program).catch((error: unknown) => {
  process.stderr.write(`bench:compression failed: ${error instanceof Error ? error.message : String(error)}\n`)
  process.exit(1)
})
