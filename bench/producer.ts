/**
 * `npm run bench:producer [-- --engine kafkajs|platformatic|both]`: the KafkaProducer over each engine against that
 * engine's own raw API, and Kafka's own ProducerPerformance, on one broker in one run (the test broker, started here
 * unless KAFKA_BROKERS names one). Prints the figures and writes them to bench/results/producer.json.
 *
 * Every contender writes 100,000 1 KiB records, keyed by 10,000 distinct keys, with acks=all and an idempotent
 * producer, to a fresh topic of 6 partitions, which is checked afterwards (its end offsets must add up to 100,000)
 * and deleted. Per engine:
 *
 * (a) ours: `KafkaProducer.send` from 64 concurrent fibers, each sending its share one record at a time and
 *     awaiting each; the producer's one drain fiber batches what is waiting.
 * (b) the raw engine: one awaited send of one record per call, from 64 concurrent async callers.
 * (c) the raw engine: sends of 1,000 records per request, awaited one after the other (the idempotent producers of
 *     both engines send one request at a time per broker, so concurrent requests would only queue).
 * (e) the raw engine: sends of 64 records per request, one after the other: what the engine itself does with as many
 *     records in flight as (a) has, the bound for any batching producer over it in (a)'s situation.
 * (f) ours: one `sendAll` of the 100,000 records.
 * (g) ours: `send` from 4,096 concurrent fibers.
 * and once: (d) Kafka's ProducerPerformance (Java), its default producer settings, as the ceiling.
 *
 * Issue 17's targets, per engine: (P1a) a/b ≥ 10; (P1b) f/c and g/c ≥ 0.9.
 *
 * (a), (c), (e), (f) and (g) of every engine run in turn, three rounds, each reported as its median (the machine's
 * speed drifts over a run, and a contender run once carries that drift into its ratios); (b), a few thousand
 * records/s, and (d) run once.
 *
 * Warm-up: the broker first takes 100,000 records from an unmeasured ProducerPerformance run. Then every Node
 * contender sends 5,000 records to a separate warm-up topic with the same producer (connections open, metadata
 * loaded, code compiled) before the timed 100,000; (d) treats the first 5,000 of its 100,000 as warm-up
 * (`--warmup-records`) and its steady-state line is the figure. The Node contenders encode each event with
 * `JSON.stringify` as they send it; ProducerPerformance sends 1,024 random bytes (`--record-size`).
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
import { Kafka, logLevel, type Message, Partitioners } from "kafkajs"
import * as Broker from "../scripts/kafka/broker.ts"
import * as KafkaProducer from "../src/KafkaProducer.ts"
import { clientLayer, type Engine, enginesFromArgs } from "./support.ts"

const here = import.meta.dirname
const exec = promisify(execFile)
const stamp = () => `${Date.now()}-${Math.random().toString(16).slice(2, 8)}`

const records = 100_000
const recordBytes = 1024
const partitions = 6
const keys = 10_000
const callers = 64
const manyCallers = 4_096
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

/** The indexes caller `c` of `n` sends: c, c + n, c + 2n, … below `count`. */
function* shareOf(c: number, n: number, count: number) {
  for (let i = c; i < count; i += n) yield i
}

/** (a), (g) Ours: seconds for `records` sends from `fibers` fibers, each awaiting each, after the warm-up. */
const ours = (brokers: string, engine: Engine, fibers: number, topic: string, warmupTopic: string) =>
  Effect.gen(function* () {
    const producer = yield* KafkaProducer.KafkaProducer
    const sendAll = (to: string, count: number) =>
      Effect.forEach(
        Array.from({ length: fibers }, (_, c) => c),
        (c) =>
          Effect.gen(function* () {
            for (const i of shareOf(c, fibers, count))
              yield* producer.send({ topic: to, key: keyOf(i), value: eventJson(i) })
          }),
        { concurrency: "unbounded", discard: true }
      )
    yield* sendAll(warmupTopic, warmup)
    const started = performance.now()
    yield* sendAll(topic, records)
    return (performance.now() - started) / 1000
  }).pipe(Effect.provide(KafkaProducer.layer(ourOptions).pipe(Layer.provide(clientLayer(brokers, engine)))))

/** (f) Ours: seconds for one `sendAll` of the `records`, after the warm-up. */
const oursSendAll = (brokers: string, engine: Engine, topic: string, warmupTopic: string) =>
  Effect.gen(function* () {
    const producer = yield* KafkaProducer.KafkaProducer
    const all = (to: string, count: number) =>
      producer.sendAll(Array.from({ length: count }, (_, i) => ({ topic: to, key: keyOf(i), value: eventJson(i) })))
    yield* all(warmupTopic, warmup)
    const started = performance.now()
    yield* all(topic, records)
    return (performance.now() - started) / 1000
  }).pipe(Effect.provide(KafkaProducer.layer(ourOptions).pipe(Layer.provide(clientLayer(brokers, engine)))))

/** An engine's own idempotent producer as a user would make one, with murmur2 keys as ours and Java. */
interface RawProducer {
  readonly send: (topic: string, messages: ReadonlyArray<number>) => Promise<unknown>
  readonly close: () => Promise<unknown>
}

const rawProducers: Readonly<Record<Engine, (brokers: string) => Promise<RawProducer>>> = {
  kafkajs: async (brokers) => {
    const producer = raw(brokers).producer({
      idempotent: true,
      allowAutoTopicCreation: false,
      createPartitioner: Partitioners.DefaultPartitioner
    })
    await producer.connect()
    return {
      send: (topic, indexes) => producer.send({ topic, acks: -1, messages: indexes.map(message) }),
      close: () => producer.disconnect()
    }
  },
  platformatic: async (brokers) => {
    const { Producer, compatibilityPartitioner } = await import("@platformatic/kafka")
    const producer = new Producer({
      clientId: "bench",
      bootstrapBrokers: brokers.split(","),
      idempotent: true,
      acks: -1,
      // Java's murmur2 for keys (every record here has one; its default partitioner is not Java's).
      partitioner: compatibilityPartitioner
    })
    return {
      send: (topic, indexes) =>
        producer.send({
          messages: indexes.map((i) => ({ topic, key: Buffer.from(keyOf(i)), value: Buffer.from(eventJson(i)) }))
        }),
      close: () => producer.close()
    }
  }
}

const message = (i: number): Message => ({ key: keyOf(i), value: eventJson(i) })

/** (b) One awaited send of one record per call from 64 async callers; seconds after the warm-up. */
const rawPerRecord = async (engine: Engine, brokers: string, topic: string, warmupTopic: string) => {
  const producer = await rawProducers[engine](brokers)
  const sendAll = (to: string, count: number) =>
    Promise.all(
      Array.from({ length: callers }, async (_, c) => {
        for (const i of shareOf(c, callers, count)) await producer.send(to, [i])
      })
    )
  return timedAfterWarmup(
    producer,
    () => sendAll(warmupTopic, warmup),
    () => sendAll(topic, records)
  )
}

/** (c), (e) Sends of `size` records per request, one request at a time; seconds after the warm-up. */
const rawBatched = async (engine: Engine, brokers: string, topic: string, warmupTopic: string, size: number) => {
  const producer = await rawProducers[engine](brokers)
  const sendAll = async (to: string, count: number) => {
    for (let first = 0; first < count; first += size) {
      const indexes: Array<number> = []
      for (let i = first; i < Math.min(first + size, count); i++) indexes.push(i)
      await producer.send(to, indexes)
    }
  }
  return timedAfterWarmup(
    producer,
    () => sendAll(warmupTopic, warmup),
    () => sendAll(topic, records)
  )
}

const timedAfterWarmup = async (producer: RawProducer, warm: () => Promise<unknown>, run: () => Promise<unknown>) => {
  try {
    await warm()
    const started = performance.now()
    await run()
    return (performance.now() - started) / 1000
  } finally {
    await producer.close()
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
  const broker = external ? undefined : yield* Effect.acquireRelease(Broker.start({ jvm: "server" }), Broker.stop)
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
  const engines = enginesFromArgs(process.argv.slice(2))
  // A contender that fails ends the benchmark, with its error.
  const timed = <E>(seconds: Effect.Effect<number, E>) => Effect.orDie(Effect.map(seconds, perSecond))
  const fromPromise = (run: () => Promise<number>) => timed(Effect.promise(run))
  /** The contenders run in rounds, per engine, each with its name and how it runs against a topic. */
  const roundContenders = (engine: Engine) =>
    [
      ["ours", (t: string, w: string) => timed(ours(brokers, engine, callers, t, w))],
      ["oursSendAll", (t: string, w: string) => timed(oursSendAll(brokers, engine, t, w))],
      ["ours4096", (t: string, w: string) => timed(ours(brokers, engine, manyCallers, t, w))],
      ["rawBatched", (t: string, w: string) => fromPromise(() => rawBatched(engine, brokers, t, w, requestSize))],
      ["rawBatched64", (t: string, w: string) => fromPromise(() => rawBatched(engine, brokers, t, w, callers))]
    ] as const
  type Name = ReturnType<typeof roundContenders>[number][0]
  const measured = Object.fromEntries(engines.map((engine) => [engine, {} as Record<Name, Array<number>>])) as Record<
    Engine,
    Record<Name, Array<number>>
  >
  for (let round = 1; round <= rounds; round++) {
    yield* log(`round ${round} of ${rounds}`)
    for (const engine of engines) {
      for (const [name, run] of roundContenders(engine)) {
        const result = yield* contender(`${engine}-${name}`, (topic, warmupTopic) =>
          Effect.flatMap(warmupTopic, (warm) => run(topic, warm))
        )
        const list = measured[engine][name] ?? []
        list.push(result.perSecond)
        measured[engine][name] = list
      }
    }
  }
  const median = (values: ReadonlyArray<number>) =>
    [...values].sort((x, y) => x - y)[Math.floor(values.length / 2)] ?? 0
  const perRecord: Partial<Record<Engine, number>> = {}
  for (const engine of engines) {
    perRecord[engine] = (yield* contender(`${engine}-raw1`, (topic, warmupTopic) =>
      Effect.flatMap(warmupTopic, (warm) => fromPromise(() => rawPerRecord(engine, brokers, topic, warm)))
    )).perSecond
  }
  const d = yield* contender("java", (topic) => Effect.promise(() => producerPerformance(jars, brokers, topic)))

  const ratio = (x: number, y: number) => Number((x / y).toFixed(2))
  const byEngine = Object.fromEntries(
    engines.map((engine) => {
      const m = measured[engine]
      const figures = {
        ours: median(m.ours),
        oursSendAll: median(m.oursSendAll),
        ours4096: median(m.ours4096),
        rawPerRecord: perRecord[engine] ?? 0,
        rawBatched: median(m.rawBatched),
        rawBatched64: median(m.rawBatched64)
      }
      const ratios = {
        oursOverRawPerRecord: ratio(figures.ours, figures.rawPerRecord),
        oursOverRawBatched: ratio(figures.ours, figures.rawBatched),
        oursSendAllOverRawBatched: ratio(figures.oursSendAll, figures.rawBatched),
        ours4096OverRawBatched: ratio(figures.ours4096, figures.rawBatched),
        oursOverRawBatched64: ratio(figures.ours, figures.rawBatched64),
        rawBatched64OverRawBatched: ratio(figures.rawBatched64, figures.rawBatched),
        oursOverProducerPerformance: ratio(figures.ours, d.perSecond)
      }
      const targets = {
        p1a: { what: "a/b", target: 10, met: ratios.oursOverRawPerRecord >= 10 },
        p1bSendAll: { what: "f/c", target: 0.9, met: ratios.oursSendAllOverRawBatched >= 0.9 },
        p1b4096: { what: "g/c", target: 0.9, met: ratios.ours4096OverRawBatched >= 0.9 }
      }
      return [engine, { recordsPerSecond: figures, roundsPerSecond: m, ratios, targets }]
    })
  )
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
        manyCallers,
        linger: Duration.format(ourOptions.linger),
        batchSize: ourOptions.batchSize,
        queueCapacity: ourOptions.queueCapacity,
        lanes: ourOptions.lanes
      },
      rawPerRecord: { callers, recordsPerRequest: 1 },
      rawBatched: { recordsPerRequest: requestSize, concurrentRequests: 1 },
      rawBatched64: { recordsPerRequest: callers, concurrentRequests: 1 },
      rounds: { count: rounds, figure: "median" },
      producerPerformance: { payload: "random bytes (--record-size)", keyDistribution: "range", summary: d.summary }
    },
    producerPerformance: d.perSecond,
    engines: byEngine
  }
  for (const engine of engines) {
    const { recordsPerSecond: f, ratios: r, targets: t } = byEngine[engine] as (typeof byEngine)[string] & {}
    const met = (x: { readonly met: boolean }) => (x.met ? "met" : "not met")
    yield* log(`${engine}:
(a) ours, 64 fibers, send + await each     ${f.ours} records/s
(f) ours, sendAll(100,000)                 ${f.oursSendAll} records/s
(g) ours, 4,096 fibers, send + await each  ${f.ours4096} records/s
(b) raw send(1) x 64 callers               ${f.rawPerRecord} records/s
(c) raw send(1,000), sequential            ${f.rawBatched} records/s
(e) raw send(64), sequential               ${f.rawBatched64} records/s
a/e ${r.oursOverRawBatched64}   e/c ${r.rawBatched64OverRawBatched} (what 64 records in flight allow the engine itself)
P1a a/b ${r.oursOverRawPerRecord} (≥ 10: ${met(t.p1a)})   P1b f/c ${r.oursSendAllOverRawBatched} (≥ 0.9: ${met(t.p1bSendAll)})   g/c ${r.ours4096OverRawBatched} (≥ 0.9: ${met(t.p1b4096)})   a/c ${r.oursOverRawBatched}   a/d ${r.oursOverProducerPerformance}`)
  }
  yield* log(`(d) ProducerPerformance (Java)             ${d.perSecond} records/s`)

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
