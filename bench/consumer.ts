/**
 * `npm run bench:consumer [-- --engine kafkajs|platformatic|both]`: the Consumer over each engine against that
 * engine's own consume loop, and Kafka's own ConsumerPerformance, on one broker in one run (the test broker, started
 * here unless KAFKA_BROKERS names one). Prints the figures and writes them to bench/results/consumer.json.
 *
 * (a) throughput: 200,000 1 KiB JSON events on 6 partitions, a no-op handler. Per engine: ours decoding each as the
 *     Processor does (UTF-8, JSON.parse, the Event Schema) and ours with a handler that does nothing (the
 *     Consumer's own cost); the engine's raw loop (kafkajs `eachBatch`; @platformatic/kafka's `MessagesStream`)
 *     JSON.parse'ing each, and the same loop doing the Processor's decode. ConsumerPerformance is the ceiling. The
 *     contenders of every engine run in turn, three rounds, each figure its median: the first round warms the code
 *     (a cold kafkajs alone ran at about 60% of its warm speed). Issue 17's P2: no decode ≥ 1.0 × raw + JSON.parse;
 *     decoding ≥ 0.8 × raw + the same decode.
 * (b) I/O-bound (kafkajs): 20,000 records, 10,000 keys, 6 partitions, a handler that waits 5 ms: ours with 64
 *     workers vs kafkajs `eachMessage` with partitionsConsumedConcurrently 6; per-key order violations counted.
 * (c) memory, per engine: peak RSS of the consumer program (`src/consumer.ts`, as `node dist/consumer.js` runs) at
 *     its defaults, with no flags from us, draining a 1,000,000-event backlog, sampled every 500 ms. The program
 *     applies its own heap policy (src/programs/heap.ts). Issue 17's P4: ≤ 250 MB.
 */
import { execFile, spawn } from "node:child_process"
import * as Fs from "node:fs"
import * as Os from "node:os"
import * as Path from "node:path"
import { promisify } from "node:util"
import { Deferred, Duration, Effect, Fiber, Layer, Schema } from "effect"
import { Kafka, logLevel } from "kafkajs"
import * as Broker from "../scripts/kafka/broker.ts"
import * as Event from "../src/Event.ts"
import type * as KafkaClient from "../src/KafkaClient.ts"
import * as KafkaConsumer from "../src/KafkaConsumer.ts"
import * as KafkaProducer from "../src/KafkaProducer.ts"
import { heapFlags } from "../src/programs/heap.ts"
import { clientLayer, type Engine, enginesFromArgs } from "./support.ts"

const here = import.meta.dirname
const exec = promisify(execFile)
const stamp = () => `${Date.now()}-${Math.random().toString(16).slice(2, 8)}`

const java = async (jars: string, main: string, args: ReadonlyArray<string>) => {
  const { stdout } = await exec("java", ["-Xmx1g", "-cp", `${jars}/*`, main, ...args], { maxBuffer: 64 * 1024 * 1024 })
  return stdout
}

const raw = (brokers: string) =>
  new Kafka({ brokers: brokers.split(","), logLevel: logLevel.NOTHING, clientId: "bench" })

const createTopic = async (brokers: string, topic: string, partitions: number) => {
  const admin = raw(brokers).admin()
  await admin.connect()
  await admin.createTopics({ topics: [{ topic, numPartitions: partitions }], waitForLeaders: true })
  await admin.disconnect()
}

/** One JSON event of about `size` bytes, valid for the Event schema. */
const eventJson = (i: number, size: number) => {
  const base = {
    id: `evt-${i}`,
    type: "order.created",
    source: "bench",
    timestamp: "2026-11-27T10:00:00.000Z",
    subject: `entity-${i % 1000}`,
    payload: { sequence: i, padding: "" }
  }
  const padding = Math.max(0, size - JSON.stringify(base).length)
  return JSON.stringify({ ...base, payload: { sequence: i, padding: "x".repeat(padding) } })
}

/** Fills a topic with ProducerPerformance from a payload file of JSON events (null keys). */
const fillWithPerfProducer = async (jars: string, brokers: string, topic: string, count: number, size: number) => {
  const file = Path.join(Os.tmpdir(), `bench-payload-${stamp()}.ndjson`)
  Fs.writeFileSync(file, `${Array.from({ length: 200 }, (_, i) => eventJson(i, size)).join("\n")}\n`)
  await java(jars, "org.apache.kafka.tools.ProducerPerformance", [
    "--topic",
    topic,
    "--num-records",
    String(count),
    "--throughput",
    "-1",
    "--payload-file",
    file,
    "--producer-props",
    `bootstrap.servers=${brokers}`,
    "acks=1",
    "linger.ms=20",
    "batch.size=262144"
  ])
  Fs.rmSync(file)
}

/** Ours: the Consumer until `count` records were handled; seconds from start to the last one. */
const ours = (
  brokers: string,
  engine: Engine,
  topic: string,
  count: number,
  options: Partial<KafkaConsumer.ConsumerOptions>,
  handle: (record: KafkaClient.ConsumedRecord) => Effect.Effect<void>
) =>
  Effect.gen(function* () {
    const consumer = yield* KafkaConsumer.make({
      groupId: `bench-ours-${stamp()}`,
      topics: [topic],
      workers: 8,
      maxInFlight: 10_000,
      fromBeginning: true,
      commitInterval: Duration.seconds(1),
      shutdownTimeout: Duration.seconds(5),
      fetchMaxBytes: 10 * 1024 * 1024,
      ...options
    })
    let handled = 0
    const done = yield* Deferred.make<void>()
    const started = performance.now()
    const fiber = yield* Effect.forkChild(
      consumer.run((record) =>
        handle(record).pipe(
          Effect.andThen(
            Effect.sync(() => {
              if (++handled === count) Deferred.doneUnsafe(done, Effect.void)
            })
          )
        )
      )
    )
    yield* Deferred.await(done)
    const seconds = (performance.now() - started) / 1000
    yield* Fiber.interrupt(fiber)
    return seconds
  }).pipe(Effect.provide(clientLayer(brokers, engine)))

/** Raw kafkajs eachBatch (or eachMessage) until `count` records; seconds from start to the last one. */
const rawKafkajs = async (
  brokers: string,
  topic: string,
  count: number,
  mode: {
    readonly eachMessage?: (value: Buffer | null) => Promise<void>
    readonly concurrency?: number
    /** each value decoded as the Processor decodes it (UTF-8, JSON, the Event Schema), not just JSON.parse'd */
    readonly schema?: boolean
  }
) => {
  const consumer = raw(brokers).consumer({ groupId: `bench-raw-${stamp()}`, maxBytes: 10 * 1024 * 1024 })
  await consumer.connect()
  await consumer.subscribe({ topics: [topic], fromBeginning: true })
  let handled = 0
  const started = performance.now()
  await new Promise<void>((resolve) => {
    void consumer.run(
      mode.eachMessage
        ? {
            partitionsConsumedConcurrently: mode.concurrency ?? 1,
            eachMessage: async ({ message }) => {
              await mode.eachMessage?.(message.value)
              if (++handled === count) resolve()
            }
          }
        : {
            eachBatch: async ({ batch }) => {
              if (mode.schema) {
                for (const message of batch.messages)
                  decodeEventSync(JSON.parse(utf8.decode(message.value ?? new Uint8Array())))
              } else {
                for (const message of batch.messages) JSON.parse(message.value?.toString("utf8") ?? "null")
              }
              handled += batch.messages.length
              if (handled >= count) resolve()
            }
          }
    )
  })
  const seconds = (performance.now() - started) / 1000
  await consumer.disconnect()
  return seconds
}

/**
 * Raw @platformatic/kafka: its own consume loop (a `MessagesStream` read with `for await`, committing as it goes)
 * until `count` records; seconds from start to the last one.
 */
const rawPlatformatic = async (brokers: string, topic: string, count: number, mode: { readonly schema?: boolean }) => {
  const { Consumer } = await import("@platformatic/kafka")
  const consumer = new Consumer({
    clientId: "bench",
    bootstrapBrokers: brokers.split(","),
    groupId: `bench-raw-${stamp()}`,
    maxBytes: 10 * 1024 * 1024
  })
  let handled = 0
  const started = performance.now()
  const stream = await consumer.consume({ topics: [topic], mode: "earliest", autocommit: 1_000 })
  for await (const message of stream) {
    const value = message.value as Buffer | null
    if (mode.schema) decodeEventSync(JSON.parse(utf8.decode(value ?? new Uint8Array())))
    else JSON.parse(value?.toString("utf8") ?? "null")
    if (++handled >= count) break
  }
  const seconds = (performance.now() - started) / 1000
  await stream.close().catch(() => undefined)
  await consumer.close(true).catch(() => undefined)
  return seconds
}

/** An engine's own consume loop, JSON.parse'ing each value, or decoding it as the Processor does. */
const rawLoop = (engine: Engine, brokers: string, topic: string, count: number, schema: boolean) =>
  engine === "kafkajs"
    ? rawKafkajs(brokers, topic, count, { schema })
    : rawPlatformatic(brokers, topic, count, { schema })

const decodeEvent = Schema.decodeUnknownEffect(Event.Event)
const decodeEventSync = Schema.decodeUnknownSync(Event.Event)
const utf8 = new TextDecoder("utf-8", { fatal: true })
/** The value decoded as the Processor decodes it: UTF-8, JSON, then the Schema (src/Processor.ts). */
const decode = (value: Uint8Array | null) =>
  Effect.suspend(() => decodeEvent(JSON.parse(utf8.decode(value ?? new Uint8Array()))))

const median = (values: ReadonlyArray<number>) => [...values].sort((x, y) => x - y)[Math.floor(values.length / 2)] ?? 0

const main = Effect.gen(function* () {
  const jars = yield* Broker.resolveJars
  const external = process.env.KAFKA_BROKERS
  const broker = external ? undefined : yield* Effect.acquireRelease(Broker.start({ jvm: "server" }), Broker.stop)
  const brokers = external ?? broker?.brokers ?? ""
  const results: Record<string, unknown> = {
    date: new Date().toISOString(),
    kafka: Broker.kafkaVersion,
    cpus: Os.cpus().length
  }
  const log = (line: string) => Effect.sync(() => console.log(line))

  // (a) Throughput
  const throughputTopic = `bench-throughput-${stamp()}`
  const n = 200_000
  yield* Effect.promise(() => createTopic(brokers, throughputTopic, 6))
  yield* Effect.promise(() => fillWithPerfProducer(jars, brokers, throughputTopic, n, 1024))
  const perf = yield* Effect.promise(() =>
    java(jars, "org.apache.kafka.tools.ConsumerPerformance", [
      "--bootstrap-server",
      brokers,
      "--topic",
      throughputTopic,
      "--num-records",
      String(n),
      "--group",
      `bench-perf-${stamp()}`,
      "--timeout",
      "60000"
    ])
  )
  // ConsumerPerformance prints a header and one CSV line: ..., nMsg.sec is the 6th column.
  const perfLine =
    perf
      .trim()
      .split("\n")
      .at(-1)
      ?.split(",")
      .map((c) => c.trim()) ?? []
  const perfRate = Number(perfLine[5])
  const engines = enginesFromArgs(process.argv.slice(2))
  type Contender = "raw" | "rawSchema" | "ours" | "oursWithoutDecode"
  const rounds = Object.fromEntries(
    engines.map((engine) => [engine, { raw: [], rawSchema: [], ours: [], oursWithoutDecode: [] }])
  ) as unknown as Record<Engine, Record<Contender, Array<number>>>
  for (let round = 0; round < 3; round++) {
    for (const engine of engines) {
      const r = rounds[engine]
      r.raw.push(Math.round(n / (yield* Effect.promise(() => rawLoop(engine, brokers, throughputTopic, n, false)))))
      r.rawSchema.push(
        Math.round(n / (yield* Effect.promise(() => rawLoop(engine, brokers, throughputTopic, n, true))))
      )
      const oursSeconds = yield* ours(brokers, engine, throughputTopic, n, { workers: 8 }, (record) =>
        Effect.orDie(decode(record.value))
      )
      r.ours.push(Math.round(n / oursSeconds))
      const noDecode = yield* ours(brokers, engine, throughputTopic, n, { workers: 8 }, () => Effect.void)
      r.oursWithoutDecode.push(Math.round(n / noDecode))
    }
  }
  const ratio = (x: number, y: number) => Number((x / y).toFixed(2))
  const throughput = {
    records: n,
    recordBytes: 1024,
    consumerPerformancePerSecond: Math.round(perfRate),
    engines: Object.fromEntries(
      engines.map((engine) => {
        const r = rounds[engine]
        const f = {
          oursPerSecond: median(r.ours),
          oursWithoutDecodePerSecond: median(r.oursWithoutDecode),
          rawPerSecond: median(r.raw),
          rawSchemaPerSecond: median(r.rawSchema)
        }
        return [
          engine,
          {
            ...f,
            oursOverRaw: ratio(f.oursPerSecond, f.rawPerSecond),
            oursOverRawSchema: ratio(f.oursPerSecond, f.rawSchemaPerSecond),
            oursWithoutDecodeOverRaw: ratio(f.oursWithoutDecodePerSecond, f.rawPerSecond),
            targets: {
              p2WithoutDecode: { target: 1.0, met: f.oursWithoutDecodePerSecond >= f.rawPerSecond },
              p2Decoding: { target: 0.8, met: f.oursPerSecond >= 0.8 * f.rawSchemaPerSecond }
            },
            rounds: r
          }
        ]
      })
    )
  }
  results.throughput = throughput
  yield* log(
    `(a) throughput, ${n} x 1 KiB, 6 partitions, no-op handler; ConsumerPerformance (Java) ${throughput.consumerPerformancePerSecond} records/s`
  )
  for (const engine of engines) {
    const e = throughput.engines[engine] as {
      oursPerSecond: number
      oursWithoutDecodePerSecond: number
      rawPerSecond: number
      rawSchemaPerSecond: number
      oursOverRaw: number
      oursOverRawSchema: number
      oursWithoutDecodeOverRaw: number
      rounds: Record<Contender, Array<number>>
    }
    yield* log(`  ${engine}:
    ours (Schema-decoded)         ${e.oursPerSecond} records/s
    ours, handler does nothing    ${e.oursWithoutDecodePerSecond} records/s
    raw loop + JSON.parse         ${e.rawPerSecond} records/s
    raw loop + the same Schema    ${e.rawSchemaPerSecond} records/s
    P2 no decode / raw            ${e.oursWithoutDecodeOverRaw}  (target ≥ 1.0)
    P2 decoded / raw + Schema     ${e.oursOverRawSchema}  (target ≥ 0.8)
    decoded / raw + JSON.parse    ${e.oursOverRaw}  (issue 5's ratio, target ≥ 0.8)
    (rounds: raw ${e.rounds.raw.join(", ")}; raw + Schema ${e.rounds.rawSchema.join(", ")}; ours ${e.rounds.ours.join(", ")}; ours without decode ${e.rounds.oursWithoutDecode.join(", ")})`)
  }

  // (b) I/O-bound
  const ioTopic = `bench-io-${stamp()}`
  const m = 20_000
  yield* Effect.promise(() => createTopic(brokers, ioTopic, 6))
  yield* KafkaProducer.sendAll(
    Array.from({ length: m }, (_, i) => ({ topic: ioTopic, key: `key-${i % 10_000}`, value: String(i) }))
  ).pipe(
    Effect.provide(
      KafkaProducer.layer({ batchSize: 2000, queueCapacity: 50_000 }).pipe(Layer.provide(clientLayer(brokers)))
    )
  )
  const lastByKey = new Map<string, number>()
  let violations = 0
  const oursIo = yield* ours(brokers, "kafkajs", ioTopic, m, { workers: 64, maxInFlight: 5000 }, (record) =>
    Effect.sync(() => {
      const key = new TextDecoder().decode(record.key ?? new Uint8Array())
      const index = Number(new TextDecoder().decode(record.value ?? new Uint8Array()))
      if ((lastByKey.get(key) ?? -1) > index) violations++
      lastByKey.set(key, index)
    }).pipe(Effect.andThen(Effect.sleep("5 millis")))
  )
  const rawIo = yield* Effect.promise(() =>
    rawKafkajs(brokers, ioTopic, m, {
      concurrency: 6,
      eachMessage: () => new Promise((resolve) => setTimeout(resolve, 5))
    })
  )
  const io = {
    records: m,
    keys: 10_000,
    handlerMs: 5,
    oursSeconds: Number(oursIo.toFixed(2)),
    kafkajsEachMessageSeconds: Number(rawIo.toFixed(2)),
    speedup: Number((rawIo / oursIo).toFixed(1)),
    orderViolations: violations
  }
  results.ioBound = io
  yield* log(`(b) I/O-bound, ${m} records, 10,000 keys, 5 ms handler:
    ours, 64 workers             ${io.oursSeconds} s
    kafkajs eachMessage, 6 conc. ${io.kafkajsEachMessageSeconds} s
    speed-up                     ${io.speedup}x  (target ≥ 8x)
    per-key order violations     ${io.orderViolations}`)

  // (c) Memory
  const memTopic = `bench-memory-${stamp()}`
  const big = 1_000_000
  yield* Effect.promise(() => createTopic(brokers, memTopic, 6))
  yield* Effect.promise(() => fillWithPerfProducer(jars, brokers, memTopic, big, 200))
  const drainProgram = (engine: Engine) =>
    Effect.promise(
      () =>
        new Promise<{ peakMb: number; samples: Array<number>; seconds: number }>((resolve, reject) => {
          const groupId = `bench-memory-${stamp()}`
          // Type stripping is not a heap flag: the program re-executes itself with its heap policy, as from dist/.
          const child = spawn(
            process.execPath,
            ["--experimental-strip-types", "--no-warnings", Path.join(here, "..", "src", "consumer.ts")],
            {
              env: {
                PATH: process.env.PATH ?? "",
                KAFKA_BROKERS: brokers,
                KAFKA_CLIENT: engine,
                KAFKA_CONSUMER_TOPIC: memTopic,
                KAFKA_CONSUMER_GROUP_ID: groupId,
                KAFKA_CREATE_TOPICS: "true",
                LOG_LEVEL: "warn"
              },
              stdio: ["ignore", "ignore", "inherit"]
            }
          )
          // Drained when the group's committed offsets add up to the backlog (the process prints only a count).
          let handled = 0
          const admin = raw(brokers).admin()
          const drained = setInterval(() => {
            void admin
              .connect()
              .then(() => admin.fetchOffsets({ groupId, topics: [memTopic] }))
              .then((topics) => {
                handled = (topics[0]?.partitions ?? []).reduce((n, p) => n + Math.max(0, Number(p.offset)), 0)
                if (handled >= big) {
                  clearInterval(drained)
                  void admin.disconnect()
                  child.kill("SIGTERM")
                }
              })
              .catch(() => undefined)
          }, 1000)
          const samples: Array<number> = []
          const started = performance.now()
          const timer = setInterval(() => {
            try {
              const status = Fs.readFileSync(`/proc/${child.pid}/status`, "utf8")
              const rss = Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? 0) / 1024
              samples.push(Math.round(rss))
            } catch {
              // the process is gone
            }
          }, 500)
          child.on("exit", () => {
            clearInterval(timer)
            clearInterval(drained)
            if (handled < big) reject(new Error(`the memory consumer exited after ${handled} records`))
            else resolve({ peakMb: Math.max(...samples), samples, seconds: (performance.now() - started) / 1000 })
          })
        })
    )
  results.memory = {}
  for (const engine of engines) {
    const memory = yield* drainProgram(engine)
    const half = Math.floor(memory.samples.length / 2)
    const memoryResult = {
      engine,
      records: big,
      program: "src/consumer.ts at its defaults",
      peakRssMb: memory.peakMb,
      firstHalfPeakMb: Math.max(...memory.samples.slice(0, half)),
      secondHalfPeakMb: Math.max(...memory.samples.slice(half)),
      nodeFlagsFromUs: "none",
      programHeapFlags: heapFlags.join(" "),
      seconds: Number(memory.seconds.toFixed(1))
    }
    ;(results.memory as Record<string, unknown>)[engine] = memoryResult
    yield* log(`(c) memory, the consumer program at its defaults (${engine}) draining ${big} events, no flags from us:
    peak RSS                     ${memoryResult.peakRssMb} MB (target ≤ 250 MB)
    first / second half peak     ${memoryResult.firstHalfPeakMb} / ${memoryResult.secondHalfPeakMb} MB
    drained in                   ${memoryResult.seconds} s`)
  }

  Fs.mkdirSync(Path.join(here, "results"), { recursive: true })
  Fs.writeFileSync(Path.join(here, "results", "consumer.json"), `${JSON.stringify(results, null, 2)}\n`)
  yield* log("written to bench/results/consumer.json")
}).pipe(Effect.scoped)

Effect.runPromise(main).catch((error) => {
  console.error(error)
  process.exit(1)
})
