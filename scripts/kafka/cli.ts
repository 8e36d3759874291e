/**
 * The local Kafka broker from the command line.
 *
 *   node --experimental-strip-types scripts/kafka/cli.ts run   [--port 9092] [--dir D] [--auto-create-topics] [SECURITY]
 *   node --experimental-strip-types scripts/kafka/cli.ts start [--port N]    [--dir D] [--auto-create-topics] [SECURITY]
 *   node --experimental-strip-types scripts/kafka/cli.ts stop  --dir D
 *   node --experimental-strip-types scripts/kafka/cli.ts jars
 *
 * `run` (what `npm run kafka` does) keeps the broker in the foreground until Ctrl-C; `start` leaves it running
 * in the background and prints `export KAFKA_BROKERS=…` and `export KAFKA_BROKER_DIR=…` for `eval`; `stop` ends it by its PID.
 *
 * SECURITY adds listeners next to PLAINTEXT: `--sasl user:password` (repeatable) a SASL_PLAINTEXT one with
 * SCRAM-SHA-256, SCRAM-SHA-512 and PLAIN, printed as `KAFKA_SASL_BROKERS=…`; `--tls` an SSL one with a generated CA,
 * printed as `KAFKA_TLS_BROKERS=…` and `KAFKA_TLS_CA_FILE=…`.
 */
import { parseArgs } from "node:util"
import { NodeRuntime } from "@effect/platform-node"
import { Console, Effect } from "effect"
import * as Broker from "./broker.ts"

const { positionals, values } = parseArgs({
  allowPositionals: true,
  options: {
    port: { type: "string" },
    dir: { type: "string" },
    "auto-create-topics": { type: "boolean", default: false },
    sasl: { type: "string", multiple: true },
    tls: { type: "boolean", default: false }
  }
})

const port = values.port === undefined ? undefined : Number(values.port)
if (port !== undefined && !(Number.isInteger(port) && port > 0 && port < 65536)) {
  console.error(`--port must be an integer from 1 to 65535, got ${values.port}`)
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
  tls: values.tls ? true : undefined
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

const commands: Record<string, Effect.Effect<void, Broker.BrokerError>> = {
  jars: Effect.flatMap(Broker.resolveJars, (dir) => Console.log(dir)),
  start: Effect.flatMap(Broker.start(options), describe),
  stop:
    values.dir === undefined
      ? Effect.fail(new Broker.BrokerError({ message: "stop needs --dir, the KAFKA_BROKER_DIR that start printed" }))
      : Effect.flatMap(Broker.fromDir(values.dir), Broker.stop),
  run: Effect.scoped(
    Effect.gen(function* () {
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
