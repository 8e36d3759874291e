/**
 * `npm run bench:rebalance`: what a third member joining a group of two costs, classic against KIP-848's consumer
 * group protocol, on one broker in one run (the test broker, started here unless KAFKA_BROKERS names one). Prints
 * the figures and writes them to bench/results/rebalance.json.
 *
 * A topic of 12 partitions takes a steady stream of records (a producer sending 20 records every 10 ms) while two
 * members consume it, each batch call taking 5 ms a record batch (work). Once both have 6 partitions, a third member
 * joins. Measured from the moment it is made:
 *
 * - settled: until the three members' assignments are disjoint, cover the 12 partitions and have 4 each;
 * - stalled: the longest time during that window in which the two members already there handled nothing at all,
 *   between them
 *   (a classic rebalance stops every member; KIP-848's moves only the partitions that change hands).
 *
 * Each setup runs 3 times, each figure the median. Setups: the platformatic engine with each protocol (at each
 * protocol's default heartbeat interval: ours, 3 s, for classic; the broker's `group.consumer.heartbeat.interval.ms`,
 * 5 s, for KIP-848), and kafkajs (classic) for reference.
 */
import * as Fs from "node:fs"
import * as Os from "node:os"
import * as Path from "node:path"
import { Deferred, Duration, Effect, Fiber, Layer, Option, Ref, References, Stream } from "effect"
import * as Broker from "../scripts/kafka/broker.ts"
import * as KafkaClient from "../src/KafkaClient.ts"
import * as KafkaProducer from "../src/KafkaProducer.ts"
import { clientLayer, type Engine } from "./support.ts"

const here = import.meta.dirname
const partitions = 12
const rounds = 3
const stamp = () => `${Date.now()}-${Math.random().toString(16).slice(2, 8)}`

interface Setup {
  readonly name: string
  readonly engine: Engine
  readonly groupProtocol: "classic" | "consumer"
}

const setups: ReadonlyArray<Setup> = [
  { name: "platformatic, classic", engine: "platformatic", groupProtocol: "classic" },
  { name: "platformatic, consumer (KIP-848)", engine: "platformatic", groupProtocol: "consumer" },
  { name: "kafkajs, classic", engine: "kafkajs", groupProtocol: "classic" }
]

/** One member: its assignments as they come, and the time of each batch call it made. */
const member = (groupId: string, topic: string, setup: Setup, handled: Array<number>) =>
  Effect.gen(function* () {
    const client = yield* KafkaClient.KafkaClient
    const connection = yield* client.consumer({
      groupId,
      topics: [topic],
      fromBeginning: false,
      fetchMaxWait: Duration.millis(100),
      partitionsConsumedConcurrently: partitions,
      groupProtocol: setup.groupProtocol
    })
    yield* connection.run(() =>
      Effect.sleep("5 millis").pipe(Effect.andThen(Effect.sync(() => void handled.push(performance.now()))))
    )
    return connection
  })

const untilAssigned = (connection: KafkaClient.ConsumerConnection, count: number) =>
  connection.assignments.pipe(
    Stream.filter((a) => a.partitions.length === count),
    Stream.runHead,
    Effect.map(Option.getOrThrow)
  )

/** The longest gap between consecutive times in `times` within [from, to] (from and to count as events). */
const longestGap = (times: ReadonlyArray<number>, from: number, to: number) => {
  const inside = [from, ...times.filter((t) => t > from && t < to).sort((a, b) => a - b), to]
  let gap = 0
  for (let i = 1; i < inside.length; i++) gap = Math.max(gap, (inside[i] as number) - (inside[i - 1] as number))
  return gap
}

const once = (brokers: string, setup: Setup) =>
  Effect.gen(function* () {
    const client = yield* KafkaClient.KafkaClient
    const topic = `bench-rebalance-${stamp()}`
    yield* client.admin.createTopics([{ topic, partitions }])
    const groupId = `${topic}-group`
    // A steady stream of records over every partition for the whole measurement.
    const producing = yield* Effect.forkChild(
      Effect.forever(
        KafkaProducer.sendAll(
          Array.from({ length: 20 }, (_, i) => ({ topic, key: `k-${Math.random()}-${i}`, value: "x" }))
        ).pipe(Effect.andThen(Effect.sleep("10 millis")))
      )
    )
    const handledA: Array<number> = []
    const handledB: Array<number> = []
    const a = yield* member(groupId, topic, setup, handledA)
    const b = yield* member(groupId, topic, setup, handledB)
    yield* Effect.all([untilAssigned(a, 6), untilAssigned(b, 6)], { concurrency: 2 })
    // Both settled and working for a moment before the third comes.
    yield* Effect.sleep("2 seconds")
    const started = performance.now()
    const c = yield* member(groupId, topic, setup, [])
    const settled = yield* Deferred.make<number>()
    const watch = Effect.gen(function* () {
      while (true) {
        const all = yield* Effect.all([a.assignment, b.assignment, c.assignment])
        const keys = all.flatMap((x) => x.partitions.map((tp) => tp.partition))
        if (all.every((x) => x.partitions.length === 4) && new Set(keys).size === partitions) {
          return yield* Deferred.succeed(settled, performance.now())
        }
        yield* Effect.sleep("20 millis")
      }
    })
    const watcher = yield* Effect.forkChild(watch)
    const at = yield* Deferred.await(settled).pipe(Effect.timeout("120 seconds"))
    yield* Fiber.interrupt(watcher)
    yield* Fiber.interrupt(producing)
    const stalled = longestGap([...handledA, ...handledB], started, at)
    yield* client.admin.deleteTopics([topic]).pipe(Effect.ignore)
    return { settledMs: Math.round(at - started), stalledMs: Math.round(stalled) }
  }).pipe(
    Effect.scoped,
    Effect.provide(
      KafkaProducer.layer({ idempotent: false, acks: 1, linger: Duration.zero }).pipe(
        Layer.provideMerge(clientLayer(brokers, setup.engine))
      )
    )
  )

const main = Effect.gen(function* () {
  const external = process.env.KAFKA_BROKERS
  const broker = external ? undefined : yield* Effect.acquireRelease(Broker.start({ jvm: "server" }), Broker.stop)
  const brokers = external ?? broker?.brokers ?? ""
  const log = (line: string) => Effect.sync(() => console.log(line))
  const median = (values: ReadonlyArray<number>) =>
    [...values].sort((x, y) => x - y)[Math.floor(values.length / 2)] ?? 0
  const measured = yield* Ref.make<Record<string, Array<{ settledMs: number; stalledMs: number }>>>({})
  for (let round = 1; round <= rounds; round++) {
    for (const setup of setups) {
      const result = yield* once(brokers, setup)
      yield* log(`round ${round}, ${setup.name}: settled in ${result.settledMs} ms, stalled ${result.stalledMs} ms`)
      yield* Ref.update(measured, (m) => ({ ...m, [setup.name]: [...(m[setup.name] ?? []), result] }))
    }
  }
  const all = yield* Ref.get(measured)
  const figures = Object.fromEntries(
    setups.map((setup) => {
      const runs = all[setup.name] ?? []
      return [
        setup.name,
        {
          settledMs: median(runs.map((r) => r.settledMs)),
          stalledMs: median(runs.map((r) => r.stalledMs)),
          runs
        }
      ]
    })
  )
  const results = {
    date: new Date().toISOString(),
    node: process.version,
    kafka: Broker.kafkaVersion,
    cpus: Os.cpus().length,
    parameters: { partitions, members: "2, then a third", rounds, figure: "median" },
    setups: figures
  }
  for (const setup of setups) {
    const f = figures[setup.name] as { settledMs: number; stalledMs: number }
    yield* log(
      `${setup.name.padEnd(34)} settled ${f.settledMs} ms   longest stop of the members already there ${f.stalledMs} ms`
    )
  }
  Fs.mkdirSync(Path.join(here, "results"), { recursive: true })
  Fs.writeFileSync(Path.join(here, "results", "rebalance.json"), `${JSON.stringify(results, null, 2)}\n`)
  yield* log("written to bench/results/rebalance.json")
}).pipe(Effect.scoped, Effect.provideService(References.MinimumLogLevel, "Warn"))

Effect.runPromise(main).catch((error) => {
  console.error(error)
  process.exit(1)
})
