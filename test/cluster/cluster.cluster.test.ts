/**
 * A real three-node KRaft cluster (`scripts/kafka/cluster.ts`): the script itself, and faults that only a cluster
 * has, each with the producer and the consumer as separate OS processes and the counts checked record by record.
 * Every fault test runs on both engines.
 */
import * as Fs from "node:fs"
import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import { Kafka, logLevel } from "kafkajs"
import * as Broker from "../../scripts/kafka/broker.ts"
import * as Cluster from "../../scripts/kafka/cluster.ts"
import * as Program from "../../scripts/program.ts"
import { awaitCommittedToEnd, consumerProgramEnv, readTopic, uniqueName } from "../support/kafka.ts"
import {
  admin,
  createReplicated,
  eventIds,
  eventually,
  keepLogOnFailure,
  leaderOf,
  processedIds,
  producerLines,
  producerProcess
} from "./support.ts"

describe("a three-node cluster", () => {
  it.live(
    "the script: three nodes, replication factor 3 and min.insync.replicas=2 by default; a node killed, paused and restarted on its own data; stop ends every PID",
    () =>
      Effect.gen(function* () {
        const pids: Array<number> = []
        yield* Effect.scoped(
          Effect.gen(function* () {
            const cluster = yield* Cluster.acquire({ nodes: 3 })
            pids.push(...cluster.nodes.map((node) => node.pid))
            assert.strictEqual(cluster.nodes.length, 3)
            assert.strictEqual(new Set(cluster.nodes.map((node) => node.port)).size, 3, "a port each")
            assert.strictEqual(new Set(cluster.nodes.map((node) => node.dir)).size, 3, "a directory each")
            for (const node of cluster.nodes) assert.isTrue(Broker.isAlive(node.pid), `node ${node.id} runs`)

            const topic = uniqueName("replicated")
            yield* createReplicated(cluster.brokers, topic, 3)
            const described = yield* Effect.promise(() =>
              admin(cluster.brokers, async (client) => {
                const metadata = await client.fetchTopicMetadata({ topics: [topic] })
                const configs = await client.describeConfigs({
                  resources: [{ type: 2, name: topic, configNames: ["min.insync.replicas"] }],
                  includeSynonyms: false
                })
                return {
                  replicas: metadata.topics[0]?.partitions.map((p) => p.replicas.length),
                  minIsr: configs.resources[0]?.configEntries[0]?.configValue
                }
              })
            )
            assert.deepStrictEqual(described, { replicas: [3, 3, 3], minIsr: "2" })

            yield* Cluster.kill(cluster, 2)
            assert.isFalse(Broker.isAlive(cluster.nodes[1]?.pid ?? 0), "node 2 is gone")
            // The controller moves the dead node's leaderships once it misses its session (9 s): waited for.
            const survivors = cluster.brokers
              .split(",")
              .filter((_, i) => i !== 1)
              .join(",")
            yield* eventually(
              Effect.promise(() =>
                admin(survivors, async (client) => {
                  const metadata = await client.fetchTopicMetadata({ topics: [topic] })
                  return (metadata.topics[0]?.partitions ?? []).every((p) => p.leader !== 2 && p.leader >= 0)
                }).catch(() => false)
              ),
              "node 2's partitions to have other leaders"
            )
            // Two of three in sync: acks=all writes still succeed (once the dead one left the ISR).
            yield* Effect.promise(async () => {
              // Retrying for up to about 30 s: the dead node leads some partitions until the controller notices
              // (broker.session.timeout.ms, 9 s) and elects another.
              const producer = new Kafka({
                brokers: cluster.brokers.split(",").filter((_, i) => i !== 1),
                logLevel: logLevel.NOTHING,
                retry: { retries: 15, initialRetryTime: 300, maxRetryTime: 3_000 }
              }).producer({ idempotent: true })
              await producer.connect()
              try {
                await producer.send({ topic, acks: -1, messages: [{ value: "with two of three" }] })
              } finally {
                await producer.disconnect()
              }
            })
            const restarted = yield* Cluster.restart(cluster, 2)
            pids.push(restarted.nodes[1]?.pid ?? 0)
            assert.isTrue(Broker.isAlive(restarted.nodes[1]?.pid ?? 0), "node 2 runs again")
            const state = (pid: number) => /State:\s+(\S)/.exec(Fs.readFileSync(`/proc/${pid}/status`, "utf8"))?.[1]
            const third = restarted.nodes[2]?.pid ?? 0
            yield* Cluster.pause(restarted, 3)
            assert.strictEqual(state(third), "T", "node 3 stopped (SIGSTOP), not dead")
            yield* Cluster.resume(restarted, 3)
            assert.notStrictEqual(state(third), "T", "node 3 runs again")
            const stored = yield* readTopic(restarted.brokers, topic)
            assert.deepStrictEqual(
              stored.map((r) => r.value),
              ["with two of three"]
            )
          })
        )
        for (const pid of pids) assert.isFalse(Broker.isAlive(pid), `pid ${pid} stopped with the scope`)
      }),
    300_000
  )

  it.live(
    "the leader of a busy partition killed -9 while 20,000 events are sent (acks=all, idempotent), on both engines at once: 0 acked lost, duplicates counted, every stored event handled",
    () =>
      Effect.scoped(
        Effect.gen(function* () {
          const cluster = yield* Cluster.acquire({ nodes: 3 })
          const total = 20_000
          const sides = yield* Effect.forEach(engines, (engine) => failoverSide(engine, cluster, total), {
            concurrency: "unbounded"
          })
          yield* Effect.forEach(
            sides,
            (side) =>
              eventually(
                Effect.sync(() => side.acked().length >= total / 4),
                "a quarter of the events acked"
              ),
            { concurrency: "unbounded", discard: true }
          )
          // The leader of kafkajs' partition 0; it leads some of platformatic's partitions too (6 on 3 nodes).
          const leader = yield* leaderOf(cluster.brokers, sides[0]?.topic ?? "", 0)
          yield* Cluster.kill(cluster, leader)
          const survivors = cluster.nodes.filter((node) => node.id !== leader).map((n) => `127.0.0.1:${n.port}`)
          yield* Effect.forEach(sides, (side) => side.verify(leader, survivors.join(",")), {
            concurrency: "unbounded",
            discard: true
          })
        })
      ),
    300_000
  )

  it.live(
    "two of three nodes down, on both engines at once: acks=all sends wait or fail with a typed error, none acked; one node back, they go through",
    () =>
      Effect.scoped(
        Effect.gen(function* () {
          const cluster = yield* Cluster.acquire({ nodes: 3 })
          const total = 100
          const topics = engines.map((engine) => uniqueName(`quorum-${engine}`))
          yield* Effect.forEach(topics, (topic) => createReplicated(cluster.brokers, topic, 3), { discard: true })
          yield* Cluster.kill(cluster, 2)
          yield* Cluster.kill(cluster, 3)
          const producers = engines.map((engine, i) =>
            Program.start(producerProcess, {
              env: {
                KAFKA_CLIENT: engine,
                KAFKA_BROKERS: cluster.brokers,
                KAFKA_PRODUCER_TOPIC: topics[i] ?? "",
                KAFKA_PRODUCER_RETRIES: "60",
                KAFKA_REQUEST_TIMEOUT_MS: "5000",
                KAFKA_RECONNECT_BACKOFF_MAX_MS: "1000",
                LOG_LEVEL: "warn",
                LOG_FORMAT: "json",
                COUNT: String(total)
              }
            })
          )
          for (const producer of producers) {
            yield* Effect.addFinalizer(() => Effect.sync(() => producer.child.kill("SIGKILL")))
          }
          const lines = (producer: Program.Program) => producer.output().stdout.split("\n")
          // The outage seen: each producer retrying (a send refused or timed out, or no broker to connect to).
          const failedDuring = yield* Effect.forEach(
            producers,
            (producer, i) =>
              Effect.gen(function* () {
                yield* eventually(
                  Effect.sync(() => /will retry|not reachable/.test(producer.output().stderr)),
                  `the ${engines[i]} producer to meet the outage`
                )
                assert.deepStrictEqual(
                  lines(producer).filter((line) => line.startsWith("acked ")),
                  [],
                  `${engines[i]}: nothing acked with one node of three: no silent success`
                )
                const failed = lines(producer).filter((line) => line.startsWith("failed "))
                for (const line of failed) assert.match(line, /KafkaError|ProducerClosed/, `a typed error: ${line}`)
                return failed.length
              }),
            { concurrency: "unbounded" }
          )
          const back = yield* Cluster.restart(cluster, 2)
          const reachable = back.nodes
            .filter((node) => node.id !== 3)
            .map((node) => `127.0.0.1:${node.port}`)
            .join(",")
          yield* Effect.forEach(
            producers,
            (producer, i) =>
              Effect.gen(function* () {
                const engine = engines[i]
                const exit = yield* producer.exited
                assert.strictEqual(exit, 0, producer.output().stderr.slice(-2000))
                assert.include(lines(producer), `done ${total}`, `${engine}: the producer ran to its end: no crash`)
                const acked = lines(producer).filter((line) => line.startsWith("acked "))
                const failed = lines(producer).filter((line) => line.startsWith("failed "))
                assert.strictEqual(acked.length + failed.length, total, `${engine}: every send has an outcome`)
                for (const line of failed) assert.match(line, /KafkaError|ProducerClosed/, `a typed error: ${line}`)
                assert.isAbove(acked.length, 0, `${engine}: sends go through once a node is back`)
                console.log(
                  `${engine}, two of three down: ${failedDuring[i]} failed during the outage, then ${acked.length} acked and ${failed.length} failed in all`
                )
                const storedIds = new Set(eventIds(yield* readTopic(reachable, topics[i] ?? "")))
                const missing = acked.map((line) => line.split(" ")[1]).filter((id) => !storedIds.has(id as string))
                assert.deepStrictEqual(missing, [], `${engine}: every acked send is stored`)
              }),
            { concurrency: "unbounded", discard: true }
          )
        })
      ),
    300_000
  )
})

const engines = ["kafkajs", "platformatic"] as const

/**
 * One engine's side of the failover test: a consumer program (LOG_LEVEL=debug: it logs every event processed) and
 * a producer process sending `total` events, on a topic of its own; `verify` checks them once the leader is dead.
 */
const failoverSide = (engine: (typeof engines)[number], cluster: Cluster.Cluster, total: number) =>
  Effect.gen(function* () {
    const topic = uniqueName(`failover-${engine}`)
    yield* createReplicated(cluster.brokers, topic, 6)
    const env = {
      KAFKA_CLIENT: engine,
      KAFKA_BROKERS: cluster.brokers,
      KAFKA_PRODUCER_TOPIC: topic,
      KAFKA_PRODUCER_RETRIES: "50",
      KAFKA_RECONNECT_BACKOFF_MAX_MS: "1000",
      LOG_LEVEL: "warn",
      LOG_FORMAT: "json"
    }
    const groupId = `${topic}-group`
    const consumer = Program.start(Program.consumerProgram, {
      env: { ...consumerProgramEnv(cluster.brokers, topic), ...env, LOG_LEVEL: "debug" }
    })
    yield* Effect.addFinalizer(() => Effect.sync(() => consumer.child.kill("SIGKILL")))
    yield* keepLogOnFailure(`${topic}-consumer`, () => consumer.output().stderr)
    const producer = Program.start(producerProcess, { env: { ...env, COUNT: String(total) } })
    yield* Effect.addFinalizer(() => Effect.sync(() => producer.child.kill("SIGKILL")))
    yield* keepLogOnFailure(`${topic}-producer`, () => producer.output().stderr)
    const acked = () => producerLines(producer).acked
    const verify = (leader: number, survivors: string) =>
      Effect.gen(function* () {
        const producerExit = yield* producer.exited
        assert.strictEqual(producerExit, 0, producer.output().stderr.slice(-2000))
        const lines = producerLines(producer)
        assert.strictEqual(lines.begun, total, `${engine}: the producer ran to its end`)
        const ackedIds = new Set(lines.acked)
        assert.strictEqual(ackedIds.size + lines.failed.length, total, `${engine}: every send has an outcome`)
        // Two of three nodes are left: the topic and the group go on without the dead leader.
        const storedIds = eventIds(yield* readTopic(survivors, topic))
        const unique = new Set(storedIds)
        const lost = [...ackedIds].filter((id) => !unique.has(id))
        assert.deepStrictEqual(lost, [], `${engine}: every acked event is stored`)
        console.log(
          `${engine}: leader ${leader} killed; ${ackedIds.size} acked, ${lines.failed.length} failed, ${lost.length} lost, ${storedIds.length - unique.size} stored twice`
        )
        yield* awaitCommittedToEnd(survivors, groupId, topic, "120 seconds")
        consumer.child.kill("SIGTERM")
        const consumerExit = yield* consumer.exited
        assert.strictEqual(consumerExit, 0, consumer.output().stderr.slice(-2000))
        const processed = new Set(processedIds(consumer.output().stderr))
        const unhandled = [...unique].filter((id) => !processed.has(id))
        assert.deepStrictEqual(
          unhandled.slice(0, 10),
          [],
          `${engine}: every stored event handled (${unhandled.length} not)`
        )
      })
    return { topic, acked, verify }
  })
