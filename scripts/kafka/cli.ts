/**
 * The local Kafka broker from the command line.
 *
 *   node --experimental-strip-types scripts/kafka/cli.ts run   [--port 9092] [--dir D] [--auto-create-topics] [SECURITY]
 *   node --experimental-strip-types scripts/kafka/cli.ts start [--port N]    [--dir D] [--auto-create-topics] [SECURITY]
 *   node --experimental-strip-types scripts/kafka/cli.ts stop  --dir D
 *   node --experimental-strip-types scripts/kafka/cli.ts jars
 *
 * A cluster of N KRaft nodes (each broker and controller; replication factor 3 and min.insync.replicas=2 by
 * default): `start --nodes 3 [--dir D]` (or `run --nodes 3`) prints every address in `KAFKA_BROKERS` and the cluster's
 * directory as `KAFKA_CLUSTER_DIR`; `stop --dir D` ends each node by its PID. One node at a time, by its number:
 *
 *   node --experimental-strip-types scripts/kafka/cli.ts kill    N --dir D   (SIGKILL)
 *   node --experimental-strip-types scripts/kafka/cli.ts pause   N --dir D   (SIGSTOP)
 *   node --experimental-strip-types scripts/kafka/cli.ts resume  N --dir D   (SIGCONT)
 *   node --experimental-strip-types scripts/kafka/cli.ts restart N --dir D   (on its own data; waits until it is back)
 *
 * `run` (what `npm run kafka` does) keeps the broker in the foreground until Ctrl-C; `start` leaves it running
 * in the background and prints `export KAFKA_BROKERS=…` and `export KAFKA_BROKER_DIR=…` for `eval`; `stop` ends it by its PID.
 *
 * SECURITY adds listeners next to PLAINTEXT: `--sasl user:password` (repeatable) a SASL_PLAINTEXT one with
 * SCRAM-SHA-256, SCRAM-SHA-512 and PLAIN, printed as `KAFKA_SASL_BROKERS=…`; `--tls` an SSL one with a generated CA,
 * printed as `KAFKA_TLS_BROKERS=…` and `KAFKA_TLS_CA_FILE=…`.
 *
 * `--jvm server` runs a single broker's JVM as production does (G1, the C2 compiler) instead of the default `lean`
 * one (C1 only, the serial collector), which starts in about half the CPU: what tests and a laptop want.
 */
import * as Fs from "node:fs"
import * as Path from "node:path"
import { parseArgs } from "node:util"
import { NodeRuntime } from "@effect/platform-node"
import { Console, Effect } from "effect"
import * as Broker from "./broker.ts"
import * as Cluster from "./cluster.ts"

const { positionals, values } = parseArgs({
  allowPositionals: true,
  options: {
    port: { type: "string" },
    nodes: { type: "string" },
    dir: { type: "string" },
    "auto-create-topics": { type: "boolean", default: false },
    sasl: { type: "string", multiple: true },
    tls: { type: "boolean", default: false },
    jvm: { type: "string", default: "lean" }
  }
})

const port = values.port === undefined ? undefined : Number(values.port)
if (port !== undefined && !(Number.isInteger(port) && port > 0 && port < 65536)) {
  console.error(`--port must be an integer from 1 to 65535, got ${values.port}`)
  process.exit(2)
}
const nodes = values.nodes === undefined ? undefined : Number(values.nodes)
if (nodes !== undefined && !(Number.isInteger(nodes) && nodes >= 1 && nodes <= 9)) {
  console.error(`--nodes must be a whole number from 1 to 9, got ${values.nodes}`)
  process.exit(2)
}
const jvm = values.jvm
if (jvm !== "lean" && jvm !== "server") {
  console.error(`--jvm must be lean or server, got ${jvm}`)
  process.exit(2)
}
const users = (values.sasl ?? []).map((credentials) => {
  const colon = credentials.indexOf(":")
  if (colon < 1) {
    console.error(`--sasl must be user:password, got ${credentials}`)
    process.exit(2)
  }
  return { username: credentials.slice(0, colon), password: credentials.slice(colon + 1) }
})
const options: Broker.BrokerOptions = {
  port,
  dir: values.dir,
  autoCreateTopics: values["auto-create-topics"],
  sasl: users.length > 0 ? { users } : undefined,
  tls: values.tls ? true : undefined,
  jvm
}

// `export` lines: `eval "$(… start)"` then sets them for the commands run after it (npm test, the programs).
const describe = (broker: Broker.Broker) =>
  Console.log(
    [
      `KAFKA_BROKERS=${broker.brokers}`,
      `KAFKA_BROKER_DIR=${broker.dir}`,
      `KAFKA_BROKER_PID=${broker.pid}`,
      ...(broker.saslBrokers ? [`KAFKA_SASL_BROKERS=${broker.saslBrokers}`] : []),
      ...(broker.tlsBrokers ? [`KAFKA_TLS_BROKERS=${broker.tlsBrokers}`] : []),
      ...(broker.caFile ? [`KAFKA_TLS_CA_FILE=${broker.caFile}`] : [])
    ]
      .map((line) => `export ${line}`)
      .join("\n")
  )

const describeCluster = (cluster: Cluster.Cluster) =>
  Console.log(
    [
      `KAFKA_BROKERS=${cluster.brokers}`,
      `KAFKA_CLUSTER_DIR=${cluster.dir}`,
      ...cluster.nodes.map((node) => `KAFKA_NODE_${node.id}=127.0.0.1:${node.port} # pid ${node.pid}, ${node.dir}`)
    ]
      .map((line) => `export ${line}`)
      .join("\n")
  )

const needDir = (command: string) =>
  values.dir === undefined
    ? Effect.fail(
        new Broker.BrokerError({ message: `${command} needs --dir, the KAFKA_CLUSTER_DIR that start printed` })
      )
    : Effect.succeed(values.dir)

/** `kill N`, `pause N`, `resume N`, `restart N`: one node of the cluster in --dir. */
const onNode = (
  command: string,
  act: (cluster: Cluster.Cluster, id: number) => Effect.Effect<unknown, Broker.BrokerError>
) =>
  Effect.gen(function* () {
    const id = Number(positionals[1])
    if (!Number.isInteger(id) || id < 1) {
      return yield* new Broker.BrokerError({ message: `${command} needs a node number, e.g. ${command} 2 --dir D` })
    }
    const cluster = yield* Cluster.fromDir(yield* needDir(command))
    yield* act(cluster, id)
    yield* Console.log(`node ${id}: ${command} done`)
  })

const isCluster = (dir: string) => Fs.existsSync(Path.join(dir, "cluster.json"))

const commands: Record<string, Effect.Effect<void, Broker.BrokerError>> = {
  kill: onNode("kill", Cluster.kill),
  pause: onNode("pause", Cluster.pause),
  resume: onNode("resume", Cluster.resume),
  restart: onNode("restart", Cluster.restart),
  jars: Effect.flatMap(Broker.resolveJars, (dir) => Console.log(dir)),
  start:
    nodes === undefined
      ? Effect.flatMap(Broker.start(options), describe)
      : Effect.flatMap(Cluster.start({ nodes, dir: values.dir }), describeCluster),
  stop:
    values.dir === undefined
      ? Effect.fail(new Broker.BrokerError({ message: "stop needs --dir, the KAFKA_BROKER_DIR that start printed" }))
      : isCluster(values.dir)
        ? Effect.flatMap(Cluster.fromDir(values.dir), Cluster.stop)
        : Effect.flatMap(Broker.fromDir(values.dir), Broker.stop),
  run: Effect.scoped(
    Effect.gen(function* () {
      if (nodes !== undefined) {
        const cluster = yield* Cluster.acquire({ nodes, dir: values.dir })
        yield* describeCluster(cluster)
        yield* Console.log(`Kafka (${nodes} nodes) is up. Ctrl-C stops it.`)
        return yield* Effect.never
      }
      const broker = yield* Broker.acquire({ ...options, port: options.port ?? 9092 })
      yield* describe(broker)
      yield* Console.log(`Kafka is up (log: ${broker.logFile}). Ctrl-C stops it.`)
      return yield* Effect.never
    })
  )
}

const command = commands[positionals[0] ?? "run"]
if (command === undefined) {
  console.error(`unknown command ${positionals[0]}; expected one of ${Object.keys(commands).join(", ")}`)
  process.exit(2)
}
NodeRuntime.runMain(command)
