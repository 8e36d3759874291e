/**
 * `npm run bench:producer`: the KafkaProducer against raw kafkajs and Kafka's own ProducerPerformance, on one
 * broker in one run (the test broker, started here unless KAFKA_BROKERS names one). Prints the figures and writes
 * them to bench/results/producer.json.
 *
 * Every contender writes 100,000 1 KiB records, keyed by 10,000 distinct keys, with acks=all and an idempotent
 * producer, to a fresh topic of 6 partitions, which is checked afterwards (its end offsets must add up to 100,000)
 * and deleted.
 *
 * (a) ours: `KafkaProducer.send` from 64 concurrent fibers, each sending its share one record at a time and
 *     awaiting each; the producer's one drain fiber batches what is waiting.
 * (b) raw kafkajs: one awaited `producer.send` of one record per call, from 64 concurrent async callers.
 * (c) raw kafkajs: `producer.send` of 1,000 records per request, awaited one after the other. Sequential is what
 *     a careful user does here: the idempotent kafkajs producer holds a lock per broker around each produce
 *     request, so concurrent requests to the single broker would only queue behind it.
 * (d) Kafka's ProducerPerformance (Java), its default producer settings, as the ceiling.
 * (e) raw kafkajs: `producer.send` of 64 records per request, awaited one after the other: what kafkajs itself does
 *     with as many records in flight as (a) has (64 callers that each await their ack never have more), the bound
 *     for any batching producer over kafkajs in (a)'s situation. a/e is ours' own cost at equal request size.
 *
 * (a), (c) and (e) run in turn, three rounds, each reported as its median (the machine's speed drifts over a run,
 * and a contender run once, early or late, carries that drift into its ratios); (b), at about 3,000 records/s, and
 * (d) run once.
 *
 * Warm-up: the broker first takes 100,000 records from an unmeasured ProducerPerformance run. Then (a) to (c) each
 * send 5,000 records to a separate warm-up topic with the same producer (connections open, metadata loaded, code
 * compiled) before the timed 100,000; (d) treats the first 5,000 of its 100,000 as warm-up (`--warmup-records`)
 * and its steady-state line is the figure. The Node contenders encode each event with `JSON.stringify` as they
 * send it; ProducerPerformance sends 1,024 random bytes (`--record-size`).
 *
 * `BENCH_LINGER_MS`, `BENCH_BATCH_SIZE`, `BENCH_QUEUE_CAPACITY` and `BENCH_LANES` override our producer's settings
 * for exploration; the JSON records the values used.
 */
import { execFile } from "node:child_process"
import * as Fs from "node:fs"
import * as Os from "node:os"
import * as Path from "node:path"
import { promisify } from "node:util"
import { Data, Duration, Effect, Layer, References, type Scope } from "effect"
import { Kafka, logLevel, type Message, Partitioners, type Producer } from "kafkajs"
import * as Broker from "../scripts/kafka/broker.ts"
import * as KafkaProducer from "../src/KafkaProducer.ts"
import { clientLayer } from "./support.ts"

const here = import.meta.dirname
const exec = promisify(execFile)
const stamp = () => `${Date.now()}-${Math.random().toString(16).slice(2, 8)}`

const records = 100_000
const recordBytes = 1024
const partitions = 6
const keys = 10_000
const callers = 64
const requestSize = 1_000
const rounds = 3
const warmup = 5_000

const envNumber = (name: string, fallback: number) => {
  const value = process.env[name]
  return value === undefined ? fallback : Number(value)
}

// Each of the 64 callers has at most one record waiting, so a batch never holds more than 64 however large
// `batchSize` is: the records that gathered while the previous request was in flight are the batch. A linger then
// only adds its full length to every round trip (with the defaults, linger 5 ms and batchSize 500, this run measured
// less than half the throughput it has without), so it is 0. batchSize 1,000 is (c)'s request size, so ours is
// never capped below it by configuration. Lanes stay at the default (1): the 64 records in flight split over several
// lanes make smaller requests, not more records in flight (measured: 2 lanes ≈ 25 records a request, 4 lanes ≈ 11,
// each about half the throughput of 1 lane on this single-broker, 2-core machine).
const ourOptions = {
  idempotent: true,
  acks: -1,
  linger: Duration.millis(envNumber("BENCH_LINGER_MS", 0)),
  batchSize: envNumber("BENCH_BATCH_SIZE", 1_000),
  queueCapacity: envNumber("BENCH_QUEUE_CAPACITY", 10_000),
  lanes: envNumber("BENCH_LANES", KafkaProducer.defaultLanes)
} satisfies Partial<KafkaProducer.ProducerOptions>

class BenchFailed extends Data.TaggedError("BenchFailed")<{ readonly message: string }> {}

const java = async (jars: string, main: string, args: ReadonlyArray<string>) => {
  const { stdout } = await exec("java", ["-Xmx1g", "-cp", `${jars}/*`, main, ...args], { maxBuffer: 64 * 1024 * 1024 })
  return stdout
}

const raw = (brokers: string) =>
  new Kafka({ brokers: brokers.split(","), logLevel: logLevel.NOTHING, clientId: "bench" })

const withAdmin = async <A>(brokers: string, use: (admin: ReturnType<Kafka["admin"]>) => Promise<A>) => {
  const admin = raw(brokers).admin()
  await admin.connect()
  try {
    return await use(admin)
  } finally {
    await admin.disconnect()
  }
}

/** A fresh topic of `partitions` partitions for the life of the scope. */
const freshTopic = (brokers: string, prefix: string) =>
  Effect.acquireRelease(
    Effect.promise(async () => {
      const topic = `${prefix}-${stamp()}`
      await withAdmin(brokers, (admin) =>
        admin.createTopics({ topics: [{ topic, numPartitions: partitions }], waitForLeaders: true })
      )
      return topic
    }),
    (topic) => Effect.promise(() => withAdmin(brokers, (admin) => admin.deleteTopics({ topics: [topic] })))
  )

/** Fails unless the topic's end offsets add up to `expected`: every record was written, once. */
const verifyCount = (brokers: string, topic: string, expected: number) =>
  Effect.promise(() => withAdmin(brokers, (admin) => admin.fetchTopicOffsets(topic))).pipe(
    Effect.flatMap((offsets) => {
      const written = offsets.reduce((sum, { high, low }) => sum + Number(high) - Number(low), 0)
      return written === expected
        ? Effect.void
        : Effect.fail(new BenchFailed({ message: `${topic} holds ${written} records, expected ${expected}` }))
    })
  )

/** The record key of record `i`: `"0"`…`"9999"`, as ProducerPerformance's `--key-distribution range` makes them. */
const keyOf = (i: number) => String(i % keys)

const eventTemplate = (i: number, padding: string) =>
  JSON.stringify({
    id: `evt-${String(i).padStart(7, "0")}`,
    type: "order.created",
    source: "bench",
    timestamp: "2026-11-27T10:00:00.000Z",
    subject: `entity-${String(i % 1000).padStart(4, "0")}`,
    payload: { sequence: String(i).padStart(7, "0"), padding }
  })
const padding = "x".repeat(recordBytes - eventTemplate(0, "").length)

/** Record `i` as a 1,024-byte JSON event, encoded when it is sent, as an application would. */
const eventJson = (i: number) => eventTemplate(i, padding)

/** The indexes caller `c` of `callers` sends: c, c + callers, c + 2 × callers, … below `count`. */
function* share(c: number, count: number) {
  for (let i = c; i < count; i += callers) yield i
}

/** (a) Ours: seconds for `records` sends from 64 fibers, after the warm-up. */
const ours = (brokers: string, topic: string, warmupTopic: string) =>
  Effect.gen(function* () {
    const producer = yield* KafkaProducer.KafkaProducer
    const sendAll = (to: string, count: number) =>
      Effect.forEach(
        Array.from({ length: callers }, (_, c) => c),
        (c) =>
          Effect.gen(function* () {
            for (const i of share(c, count)) yield* producer.send({ topic: to, key: keyOf(i), value: eventJson(i) })
          }),
        { concurrency: "unbounded", discard: true }
      )
    yield* sendAll(warmupTopic, warmup)
    const started = performance.now()
    yield* sendAll(topic, records)
    return (performance.now() - started) / 1000
  }).pipe(Effect.provide(KafkaProducer.layer(ourOptions).pipe(Layer.provide(clientLayer(brokers)))))

/** An idempotent kafkajs producer as a user would make one: defaults, plus murmur2 keys as ours and Java. */
const rawProducer = async (brokers: string) => {
  const producer = raw(brokers).producer({
    idempotent: true,
    allowAutoTopicCreation: false,
    createPartitioner: Partitioners.DefaultPartitioner
  })
  await producer.connect()
  return producer
}

const message = (i: number): Message => ({ key: keyOf(i), value: eventJson(i) })

/** (b) One awaited `send` of one record per call from 64 async callers; seconds after the warm-up. */
const kafkajsPerRecord = async (brokers: string, topic: string, warmupTopic: string) => {
  const producer = await rawProducer(brokers)
  const sendAll = (to: string, count: number) =>
    Promise.all(
      Array.from({ length: callers }, async (_, c) => {
        for (const i of share(c, count)) await producer.send({ topic: to, acks: -1, messages: [message(i)] })
      })
    )
  return timedAfterWarmup(
    producer,
    () => sendAll(warmupTopic, warmup),
    () => sendAll(topic, records)
  )
}

/** (c), (e) `send` of `size` records per request, one request at a time; seconds after the warm-up. */
const kafkajsBatched = async (brokers: string, topic: string, warmupTopic: string, size: number) => {
  const producer = await rawProducer(brokers)
  const sendAll = async (to: string, count: number) => {
    for (let first = 0; first < count; first += size) {
      const messages: Array<Message> = []
      for (let i = first; i < Math.min(first + size, count); i++) messages.push(message(i))
      await producer.send({ topic: to, acks: -1, messages })
    }
  }
  return timedAfterWarmup(
    producer,
    () => sendAll(warmupTopic, warmup),
    () => sendAll(topic, records)
  )
}

const timedAfterWarmup = async (producer: Producer, warm: () => Promise<unknown>, run: () => Promise<unknown>) => {
  try {
    await warm()
    const started = performance.now()
    await run()
    return (performance.now() - started) / 1000
  } finally {
    await producer.disconnect()
  }
}

/** (d) ProducerPerformance; records/s of its steady-state summary, the last line it prints. */
const producerPerformance = async (jars: string, brokers: string, topic: string) => {
  const output = await java(jars, "org.apache.kafka.tools.ProducerPerformance", [
    "--topic",
    topic,
    "--num-records",
    String(records),
    "--record-size",
    String(recordBytes),
    "--throughput",
    "-1",
    "--warmup-records",
    String(warmup),
    "--record-key-range",
    String(keys),
    "--key-distribution",
    "range",
    "--producer-props",
    `bootstrap.servers=${brokers}`,
    "acks=all",
    "enable.idempotence=true"
  ])
  // "95000 steady state records sent, 24123.92 records/sec (23.56 MB/sec), 1083.92 ms avg latency, …"
  const summary = output.trim().split("\n").at(-1) ?? ""
  const perSecond = Number(/records sent, ([\d.]+) records\/sec/.exec(summary)?.[1])
  if (!Number.isFinite(perSecond)) throw new Error(`no summary line in ProducerPerformance's output:\n${output}`)
  return { perSecond, summary }
}

const main = Effect.gen(function* () {
  const jars = yield* Broker.resolveJars
  const external = process.env.KAFKA_BROKERS
  const broker = external ? undefined : yield* Effect.acquireRelease(Broker.start(), Broker.stop)
  const brokers = external ?? broker?.brokers ?? ""
  const log = (line: string) => Effect.sync(() => console.log(line))

  /** Runs one contender against a fresh topic, checks the topic, and deletes it (and the warm-up topic). */
  const contender = <A extends { readonly perSecond: number }, E>(
    name: string,
    run: (topic: string, warmupTopic: Effect.Effect<string, never, Scope.Scope>) => Effect.Effect<A, E, Scope.Scope>
  ) =>
    Effect.scoped(
      Effect.gen(function* () {
        const topic = yield* freshTopic(brokers, `bench-producer-${name}`)
        const result = yield* run(topic, freshTopic(brokers, `bench-producer-${name}-warmup`))
        yield* verifyCount(brokers, topic, records)
        yield* log(`  ${name.padEnd(12)} ${Math.round(result.perSecond)} records/s, ${records} written`)
        return { ...result, perSecond: Math.round(result.perSecond) }
      })
    )
  const perSecond = (seconds: number) => ({ perSecond: records / seconds })

  // A broker fresh from start-up is slow for its first seconds (JIT, the producer-id coordinator loading): that
  // would fall on whichever contender goes first, so a run of ProducerPerformance nobody measures goes before them.
  yield* Effect.scoped(
    Effect.flatMap(freshTopic(brokers, "bench-producer-broker-warmup"), (topic) =>
      Effect.promise(() => producerPerformance(jars, brokers, topic))
    )
  )
  yield* log(
    `producing ${records} x ${recordBytes} B, ${keys} keys, ${partitions} partitions, acks=all, idempotent; ` +
      `ours: linger ${Duration.format(ourOptions.linger)}, batchSize ${ourOptions.batchSize}, ` +
      `queueCapacity ${ourOptions.queueCapacity}, lanes ${ourOptions.lanes}`
  )
  const batched = (size: number) =>
    contender(`kafkajs-${size}`, (topic, warmupTopic) =>
      Effect.flatMap(warmupTopic, (warm) => Effect.promise(() => kafkajsBatched(brokers, topic, warm, size))).pipe(
        Effect.map(perSecond)
      )
    )
  const measured = { ours: [] as Array<number>, batched: [] as Array<number>, batched64: [] as Array<number> }
  for (let round = 1; round <= rounds; round++) {
    yield* log(`round ${round} of ${rounds}`)
    measured.ours.push(
      (yield* contender("ours", (topic, warmupTopic) =>
        Effect.flatMap(warmupTopic, (warm) => ours(brokers, topic, warm)).pipe(Effect.map(perSecond))
      )).perSecond
    )
    measured.batched.push((yield* batched(requestSize)).perSecond)
    measured.batched64.push((yield* batched(callers)).perSecond)
  }
  const median = (values: ReadonlyArray<number>) =>
    [...values].sort((x, y) => x - y)[Math.floor(values.length / 2)] ?? 0
  const b = yield* contender("kafkajs-1", (topic, warmupTopic) =>
    Effect.flatMap(warmupTopic, (warm) => Effect.promise(() => kafkajsPerRecord(brokers, topic, warm))).pipe(
      Effect.map(perSecond)
    )
  )
  const d = yield* contender("java", (topic) => Effect.promise(() => producerPerformance(jars, brokers, topic)))

  const ratio = (x: number, y: number) => Number((x / y).toFixed(2))
  const figures = {
    ours: median(measured.ours),
    kafkajsPerRecord: b.perSecond,
    kafkajsBatched: median(measured.batched),
    producerPerformance: d.perSecond,
    kafkajsBatched64: median(measured.batched64)
  }
  const ratios = {
    oursOverKafkajsPerRecord: ratio(figures.ours, figures.kafkajsPerRecord),
    oursOverKafkajsBatched: ratio(figures.ours, figures.kafkajsBatched),
    oursOverProducerPerformance: ratio(figures.ours, figures.producerPerformance),
    oursOverKafkajsBatched64: ratio(figures.ours, figures.kafkajsBatched64),
    kafkajsBatched64OverKafkajsBatched: ratio(figures.kafkajsBatched64, figures.kafkajsBatched)
  }
  const targets = {
    oursOverKafkajsPerRecord: { target: 10, met: ratios.oursOverKafkajsPerRecord >= 10 },
    oursOverKafkajsBatched: { target: 0.9, met: ratios.oursOverKafkajsBatched >= 0.9 }
  }
  const results = {
    date: new Date().toISOString(),
    node: process.version,
    kafka: Broker.kafkaVersion,
    cpus: Os.cpus().length,
    parameters: {
      records,
      recordBytes,
      partitions,
      keys,
      acks: "all",
      idempotent: true,
      warmupRecords: warmup,
      ours: {
        callers,
        linger: Duration.format(ourOptions.linger),
        batchSize: ourOptions.batchSize,
        queueCapacity: ourOptions.queueCapacity,
        lanes: ourOptions.lanes
      },
      kafkajsPerRecord: { callers, recordsPerRequest: 1 },
      kafkajsBatched: { recordsPerRequest: requestSize, concurrentRequests: 1 },
      kafkajsBatched64: { recordsPerRequest: callers, concurrentRequests: 1 },
      rounds: { of: ["ours", "kafkajsBatched", "kafkajsBatched64"], count: rounds, figure: "median" },
      producerPerformance: { payload: "random bytes (--record-size)", keyDistribution: "range", summary: d.summary }
    },
    recordsPerSecond: figures,
    roundsPerSecond: measured,
    ratios,
    targets
  }
  yield* log(`(a) ours, 64 fibers, send + await each     ${figures.ours} records/s
(b) kafkajs send(1) x 64 callers           ${figures.kafkajsPerRecord} records/s
(c) kafkajs send(1,000), sequential        ${figures.kafkajsBatched} records/s
(d) ProducerPerformance (Java)             ${figures.producerPerformance} records/s
(e) kafkajs send(64), sequential           ${figures.kafkajsBatched64} records/s
a/e ${ratios.oursOverKafkajsBatched64}   e/c ${ratios.kafkajsBatched64OverKafkajsBatched} (what 64 records in flight allow kafkajs itself)
a/b ${ratios.oursOverKafkajsPerRecord} (target ≥ 10: ${targets.oursOverKafkajsPerRecord.met ? "met" : "not met"})   a/c ${ratios.oursOverKafkajsBatched} (target ≥ 0.9: ${targets.oursOverKafkajsBatched.met ? "met" : "not met"})   a/d ${ratios.oursOverProducerPerformance}`)

  Fs.mkdirSync(Path.join(here, "results"), { recursive: true })
  Fs.writeFileSync(Path.join(here, "results", "producer.json"), `${JSON.stringify(results, null, 2)}\n`)
  yield* log("written to bench/results/producer.json")
}).pipe(
  Effect.scoped,
  // kafkajs' info lines (connects, disconnects) go to the Effect logger; only warnings matter here.
  Effect.provideService(References.MinimumLogLevel, "Warn")
)

Effect.runPromise(main).catch((error) => {
  console.error(error)
  process.exit(1)
})
