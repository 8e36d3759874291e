/**
 * A local Apache Kafka cluster of N KRaft nodes on loopback, each a combined broker and controller (the quorum is
 * the N of them), from the same jars as the single broker (`broker.ts`). Every node has its own ports, log
 * directory, log file and PID; the JVMs are kept small (heap, threads) so that three of them and the tests fit on
 * a two-core machine. Topics default to replication factor 3 (or N when smaller) and `min.insync.replicas=2`, the
 * internal topics too.
 *
 * A node can be killed (SIGKILL), paused (SIGSTOP), resumed (SIGCONT) and restarted on its own data: the fault
 * tests of the cluster use these. What `start` leaves running is described in `cluster.json` in its directory, for
 * `fromDir` in another process (the CLI's `stop`, `kill N`, …).
 */
import type { ChildProcess } from "node:child_process"
import { spawn } from "node:child_process"
import { randomBytes } from "node:crypto"
import * as Fs from "node:fs"
import * as Os from "node:os"
import * as Path from "node:path"
import { Data, Duration, Effect, Exit, Schedule, Scope } from "effect"
import { Kafka, logLevel } from "kafkajs"
import {
  BrokerError,
  clusterId,
  freePort,
  isAlive,
  isBrokerOf,
  javaBin,
  jvmOptions,
  logTail,
  resolveJars,
  run
} from "./broker.ts"

export interface ClusterNode {
  /** 1…N, the node.id */
  readonly id: number
  readonly port: number
  readonly controllerPort: number
  readonly dir: string
  readonly logFile: string
  readonly pid: number
}

export interface Cluster {
  /** every node's `host:port`, comma-separated: the value for `KAFKA_BROKERS` */
  readonly brokers: string
  readonly dir: string
  /** true when `dir` was created by `start` and is removed by `stop` */
  readonly ownsDir: boolean
  readonly nodes: ReadonlyArray<ClusterNode>
}

export interface ClusterOptions {
  /** how many nodes; 3 by default */
  readonly nodes?: number | undefined
  /** where every node's data and log go; a fresh temporary directory (removed by `stop`) when omitted */
  readonly dir?: string | undefined
  /** how long to wait for the cluster to accept a replicated topic. Default 180 s */
  readonly readyTimeout?: Duration.Input | undefined
}

/** Each node's JVM heap: three fit in well under 2 GiB. */
const heap = { min: "128m", max: "384m" }

const stateFile = (dir: string) => Path.join(dir, "cluster.json")
const ownedMarker = ".owned-by-kafka-effect"

const nodeProperties = (
  node: { readonly id: number; readonly port: number; readonly controllerPort: number; readonly dataDir: string },
  voters: string,
  count: number
) => {
  const replicas = Math.min(3, count)
  const minIsr = Math.min(2, replicas)
  return [
    "process.roles=broker,controller",
    `node.id=${node.id}`,
    `controller.quorum.voters=${voters}`,
    `listeners=PLAINTEXT://127.0.0.1:${node.port},CONTROLLER://127.0.0.1:${node.controllerPort}`,
    `advertised.listeners=PLAINTEXT://127.0.0.1:${node.port}`,
    "controller.listener.names=CONTROLLER",
    "inter.broker.listener.name=PLAINTEXT",
    "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
    `log.dirs=${node.dataDir}`,
    "auto.create.topics.enable=false",
    "num.partitions=1",
    // What production clusters run: three copies, two of which must have a write before it is acked (acks=all).
    `default.replication.factor=${replicas}`,
    `min.insync.replicas=${minIsr}`,
    `offsets.topic.replication.factor=${replicas}`,
    "offsets.topic.num.partitions=10",
    `transaction.state.log.replication.factor=${replicas}`,
    `transaction.state.log.min.isr=${minIsr}`,
    `share.coordinator.state.topic.replication.factor=${replicas}`,
    `share.coordinator.state.topic.min.isr=${minIsr}`,
    "group.initial.rebalance.delay.ms=0",
    // Small: three nodes and the tests share two cores.
    "num.network.threads=2",
    "num.io.threads=2",
    "background.threads=2",
    "num.replica.fetchers=1",
    "log.cleaner.threads=1",
    "num.recovery.threads.per.data.dir=1",
    // A follower that stopped (killed, paused) leaves the ISR after 10 s instead of 30 s.
    "replica.lag.time.max.ms=10000",
    ""
  ].join("\n")
}

const propertiesFileOf = (nodeDir: string) => Path.join(nodeDir, "server.properties")

/** Spawns node `id` from its directory (detached: it outlives this process until stopped) and records its PID. */
const spawnNode = (jarsDir: string, nodeDir: string) =>
  Effect.sync(() => {
    const logFile = Path.join(nodeDir, "broker.log")
    const out = Fs.openSync(logFile, "a")
    const child: ChildProcess = spawn(
      javaBin(),
      [...jvmOptions(jarsDir, { heap }), "kafka.Kafka", propertiesFileOf(nodeDir)],
      { detached: true, stdio: ["ignore", out, out] }
    )
    Fs.closeSync(out)
    child.on("error", () => undefined)
    child.unref()
    const pid = child.pid ?? -1
    if (pid > 0) Fs.writeFileSync(Path.join(nodeDir, "broker.pid"), `${pid}\n`)
    return pid
  }).pipe(
    Effect.flatMap((pid) =>
      pid > 0
        ? Effect.succeed(pid)
        : Effect.fail(new BrokerError({ message: `could not start ${javaBin()}: is a JDK 17+ installed?` }))
    )
  )

/** The PID a node's directory records (its latest start). */
const currentPid = (nodeDir: string): number | undefined => {
  try {
    const pid = Number(Fs.readFileSync(Path.join(nodeDir, "broker.pid"), "utf8").trim())
    return Number.isInteger(pid) && pid > 0 ? pid : undefined
  } catch {
    return undefined
  }
}

const writeState = (cluster: Cluster) =>
  Fs.writeFileSync(stateFile(cluster.dir), `${JSON.stringify(cluster, null, 2)}\n`)

/** Waits (within `bound`) until `pid` is gone; succeeds with whether it is. */
const awaitGone = (pid: number, bound: Duration.Input) =>
  Effect.sync(() => !isAlive(pid)).pipe(
    Effect.repeat({ schedule: Schedule.spaced("50 millis"), until: (gone) => gone }),
    Effect.timeoutOrElse({ duration: bound, orElse: () => Effect.succeed(false) })
  )

/** Stops one node by its own PID: SIGCONT (a paused node cannot stop), SIGTERM, up to 30 s, then SIGKILL. */
const stopNode = (node: ClusterNode) =>
  Effect.gen(function* () {
    if (!isBrokerOf(node.pid, node.dir)) return
    process.kill(node.pid, "SIGCONT")
    process.kill(node.pid, "SIGTERM")
    const exited = yield* awaitGone(node.pid, "30 seconds")
    if (!exited && isBrokerOf(node.pid, node.dir)) {
      process.kill(node.pid, "SIGKILL")
      yield* awaitGone(node.pid, "10 seconds")
    }
  })

/** Stops every node (in parallel: a quorum that loses its majority makes the last ones slow to stop). */
export const stop = (cluster: Cluster): Effect.Effect<void> =>
  Effect.gen(function* () {
    yield* Effect.forEach(cluster.nodes, stopNode, { concurrency: "unbounded", discard: true })
    if (cluster.ownsDir) Fs.rmSync(cluster.dir, { recursive: true, force: true })
  })

class NotReady extends Data.TaggedError("NotReady")<{ readonly reason: string }> {}

/** Succeeds once the cluster lists `expected` brokers and creates (then deletes) a topic replicated on all. */
const awaitReady = (cluster: Cluster, expected: number, timeout: Duration.Input) =>
  Effect.gen(function* () {
    const kafka = new Kafka({
      clientId: "kafka-effect-cluster-check",
      brokers: cluster.brokers.split(","),
      logLevel: logLevel.NOTHING,
      connectionTimeout: 1000,
      retry: { retries: 0 }
    })
    const topic = `__kafka_effect_ready_${randomBytes(4).toString("hex")}`
    const attempt = Effect.gen(function* () {
      const dead = cluster.nodes.filter((node) => !isAlive(node.pid))
      if (dead.length > 0) {
        return yield* new BrokerError({
          message: `node ${dead[0]?.id} exited during start-up; its log ends with:\n${logTail(dead[0]?.logFile ?? "")}`
        })
      }
      yield* Effect.tryPromise({
        try: async () => {
          const admin = kafka.admin()
          await admin.connect()
          try {
            const { brokers } = await admin.describeCluster()
            if (brokers.length < expected) throw new Error(`${brokers.length} of ${expected} brokers registered`)
            await admin.createTopics({
              topics: [{ topic, numPartitions: 1, replicationFactor: Math.min(3, expected) }],
              waitForLeaders: true
            })
            await admin.deleteTopics({ topics: [topic] })
          } finally {
            await admin.disconnect()
          }
        },
        catch: (cause) => new NotReady({ reason: cause instanceof Error ? cause.message : String(cause) })
      })
    })
    yield* attempt.pipe(
      Effect.retry({ schedule: Schedule.spaced("300 millis"), while: (error) => error._tag === "NotReady" }),
      Effect.catchTag("NotReady", (error) => Effect.fail(new BrokerError({ message: error.reason }))),
      Effect.timeoutOrElse({
        duration: timeout,
        orElse: () =>
          Effect.fail(
            new BrokerError({
              message: `the cluster at ${cluster.brokers} was not ready within ${Duration.format(Duration.fromInputUnsafe(timeout))}; node 1's log ends with:\n${logTail(cluster.nodes[0]?.logFile ?? "")}`
            })
          )
      })
    )
  })

/**
 * A cluster for the life of the scope; every node is stopped by its PID when the scope closes, whatever happened.
 * Each node's stop is registered in the same step that spawns it.
 */
export const acquire = (options: ClusterOptions = {}): Effect.Effect<Cluster, BrokerError, Scope.Scope> =>
  Effect.gen(function* () {
    const count = options.nodes ?? 3
    if (!Number.isInteger(count) || count < 1 || count > 9) {
      return yield* new BrokerError({ message: `--nodes must be a whole number from 1 to 9, got ${count}` })
    }
    const jarsDir = yield* resolveJars
    const ownsDir = options.dir === undefined
    const dir = yield* Effect.acquireRelease(
      Effect.sync(() => {
        const dir = options.dir ?? Fs.mkdtempSync(Path.join(Os.tmpdir(), "kafka-effect-cluster-"))
        Fs.mkdirSync(dir, { recursive: true })
        if (ownsDir) Fs.writeFileSync(Path.join(dir, ownedMarker), "created by scripts/kafka/cluster.ts\n")
        return dir
      }),
      (dir) => Effect.sync(() => ownsDir && Fs.rmSync(dir, { recursive: true, force: true }))
    )
    const ports: Array<{ id: number; port: number; controllerPort: number; nodeDir: string }> = []
    for (let id = 1; id <= count; id++) {
      ports.push({ id, port: yield* freePort, controllerPort: yield* freePort, nodeDir: Path.join(dir, `node-${id}`) })
    }
    const voters = ports.map((p) => `${p.id}@127.0.0.1:${p.controllerPort}`).join(",")
    const id = clusterId()
    // Formatting every node's storage is independent work: in parallel, it takes one JVM start instead of N.
    yield* Effect.forEach(
      ports,
      (p) =>
        Effect.gen(function* () {
          Fs.mkdirSync(p.nodeDir, { recursive: true })
          const dataDir = Path.join(p.nodeDir, "data")
          Fs.writeFileSync(
            propertiesFileOf(p.nodeDir),
            nodeProperties({ id: p.id, port: p.port, controllerPort: p.controllerPort, dataDir }, voters, count)
          )
          if (!Fs.existsSync(Path.join(dataDir, "meta.properties"))) {
            yield* run(javaBin(), [
              ...jvmOptions(jarsDir, { heap }),
              "kafka.tools.StorageTool",
              "format",
              `--cluster-id=${id}`,
              "--config",
              propertiesFileOf(p.nodeDir)
            ])
          }
        }),
      { concurrency: "unbounded", discard: true }
    )
    // Every node is stopped when the scope closes, all at once (stopped one after another, the last ones would
    // wait for a quorum that is gone), each by the PID it has then (`restart` gives it a new one). The stop is
    // registered in the same step that spawns the nodes, so no path leaves one running.
    const started: Array<ClusterNode> = []
    const stopAll = Effect.suspend(() =>
      Effect.forEach(started, (node) => stopNode({ ...node, pid: currentPid(node.dir) ?? node.pid }), {
        concurrency: "unbounded",
        discard: true
      })
    )
    const nodes = yield* Effect.acquireRelease(
      Effect.forEach(ports, (p) =>
        Effect.map(spawnNode(jarsDir, p.nodeDir), (pid) => {
          const node: ClusterNode = {
            id: p.id,
            port: p.port,
            controllerPort: p.controllerPort,
            dir: p.nodeDir,
            logFile: Path.join(p.nodeDir, "broker.log"),
            pid
          }
          started.push(node)
          return node
        })
      ).pipe(Effect.onError(() => stopAll)),
      () => stopAll
    )
    const cluster: Cluster = {
      brokers: nodes.map((node) => `127.0.0.1:${node.port}`).join(","),
      dir,
      ownsDir,
      nodes
    }
    writeState(cluster)
    yield* awaitReady(cluster, count, options.readyTimeout ?? "180 seconds")
    return cluster
  })

/** Starts a cluster that keeps running after this process exits; stop it with `stop`. */
export const start = (options: ClusterOptions = {}): Effect.Effect<Cluster, BrokerError> =>
  Effect.flatMap(Scope.make(), (scope) =>
    acquire(options).pipe(
      Scope.provide(scope),
      Effect.onExit((exit) => (Exit.isSuccess(exit) ? Effect.void : Scope.close(scope, exit)))
    )
  )

/** Reads what `start` left in `dir`. */
export const fromDir = (dir: string): Effect.Effect<Cluster, BrokerError> =>
  Effect.try({
    try: () => JSON.parse(Fs.readFileSync(stateFile(dir), "utf8")) as Cluster,
    catch: (cause) => new BrokerError({ message: `no cluster in ${dir}: ${String(cause)}` })
  })

const nodeOf = (cluster: Cluster, id: number) =>
  Effect.fromNullishOr(cluster.nodes.find((node) => node.id === id)).pipe(
    Effect.mapError(
      () =>
        new BrokerError({
          message: `no node ${id}: the cluster's nodes are ${cluster.nodes.map((n) => n.id).join(", ")}`
        })
    )
  )

/** SIGKILL: the node dies at once, as a machine that loses power; waits until its process is gone. */
export const kill = (cluster: Cluster, id: number): Effect.Effect<void, BrokerError> =>
  Effect.flatMap(nodeOf(cluster, id), (node) =>
    Effect.gen(function* () {
      if (!isBrokerOf(node.pid, node.dir)) return
      process.kill(node.pid, "SIGKILL")
      if (!(yield* awaitGone(node.pid, "10 seconds"))) {
        return yield* new BrokerError({ message: `node ${id} (pid ${node.pid}) survived SIGKILL` })
      }
    })
  )

/** The process state letter of `pid` (`T` when stopped), from /proc. */
const processState = (pid: number) => {
  try {
    return /State:\s+(\S)/.exec(Fs.readFileSync(`/proc/${pid}/status`, "utf8"))?.[1]
  } catch {
    return undefined
  }
}

/** Sends `signal` and waits (5 s at most) until the node's state says it took effect. */
const signalAndWait = (cluster: Cluster, id: number, signal: "SIGSTOP" | "SIGCONT") =>
  Effect.flatMap(nodeOf(cluster, id), (node) =>
    Effect.gen(function* () {
      if (!isBrokerOf(node.pid, node.dir)) return
      process.kill(node.pid, signal)
      yield* Effect.sync(() => (processState(node.pid) === "T") === (signal === "SIGSTOP")).pipe(
        Effect.repeat({ schedule: Schedule.spaced("20 millis"), until: (done) => done }),
        Effect.timeoutOrElse({
          duration: "5 seconds",
          orElse: () => Effect.fail(new BrokerError({ message: `node ${id} did not take ${signal}` }))
        })
      )
    })
  )

/** SIGSTOP: the node hangs (neither answers nor refuses), as a machine stuck in a long GC pause. */
export const pause = (cluster: Cluster, id: number): Effect.Effect<void, BrokerError> =>
  signalAndWait(cluster, id, "SIGSTOP")

/** SIGCONT: a paused node goes on. */
export const resume = (cluster: Cluster, id: number): Effect.Effect<void, BrokerError> =>
  signalAndWait(cluster, id, "SIGCONT")

/**
 * Starts node `id` again on its own data (stopping it first if it still runs), records its new PID, and succeeds
 * once the cluster lists it again. Succeeds with the cluster as it now is.
 */
export const restart = (cluster: Cluster, id: number): Effect.Effect<Cluster, BrokerError> =>
  Effect.gen(function* () {
    const node = yield* nodeOf(cluster, id)
    yield* stopNode(node)
    const jarsDir = yield* resolveJars
    const pid = yield* spawnNode(jarsDir, node.dir)
    const next: Cluster = { ...cluster, nodes: cluster.nodes.map((n) => (n.id === id ? { ...n, pid } : n)) }
    writeState(next)
    yield* awaitRegistered(next, id)
    return next
  })

/** Waits until the cluster's metadata lists node `id` (a restarted node registers again). */
const awaitRegistered = (cluster: Cluster, id: number) =>
  Effect.tryPromise({
    try: async () => {
      const kafka = new Kafka({
        clientId: "kafka-effect-cluster-check",
        brokers: cluster.brokers.split(","),
        logLevel: logLevel.NOTHING,
        connectionTimeout: 1000,
        retry: { retries: 0 }
      })
      const admin = kafka.admin()
      await admin.connect()
      try {
        const { brokers } = await admin.describeCluster()
        if (!brokers.some((broker) => broker.nodeId === id)) throw new Error(`node ${id} not registered yet`)
      } finally {
        await admin.disconnect()
      }
    },
    catch: (cause) => new NotReady({ reason: cause instanceof Error ? cause.message : String(cause) })
  }).pipe(
    Effect.retry({ schedule: Schedule.spaced("300 millis"), times: 400 }),
    Effect.mapError((error) => new BrokerError({ message: `node ${id} did not come back: ${error.reason}` }))
  )
