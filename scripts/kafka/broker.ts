/**
 * A real single-node Apache Kafka broker (KRaft, combined broker + controller) for the tests, the benchmarks
 * and the demo, started from Maven Central artifacts with the machine's JDK. No Docker.
 *
 * - `resolveJars` runs `mvn dependency:copy-dependencies` on `pom.xml` once and caches the jars under
 *   `$XDG_CACHE_HOME/kafka-effect` (or `~/.cache/kafka-effect`), keyed by the pom's hash.
 * - `start` formats storage in a fresh directory with `kafka.tools.StorageTool`, starts `kafka.Kafka` detached,
 *   and returns only once a client can create a topic.
 * - `stop` sends SIGTERM to the broker's own PID (checked against its command line, so a recycled PID is never
 *   signalled), waits for a controlled shutdown, and SIGKILLs only if that does not come.
 *
 * Written with erasable TypeScript only, so `node --experimental-strip-types` runs it without a build.
 */
import { type ChildProcess, execFile, spawn } from "node:child_process"
import { createHash, randomBytes } from "node:crypto"
import * as Fs from "node:fs"
import * as Net from "node:net"
import * as Os from "node:os"
import * as Path from "node:path"
import { Data, Duration, Effect, Schedule, type Scope } from "effect"
import { Kafka, logLevel } from "kafkajs"

const here = Path.dirname(new URL(import.meta.url).pathname)
const pomFile = Path.join(here, "pom.xml")
const log4jConfig = Path.join(here, "log4j2.properties")

/** The Apache Kafka version that `pom.xml` pins. */
export const kafkaVersion =
  /<kafka\.version>([^<]+)<\/kafka\.version>/.exec(Fs.readFileSync(pomFile, "utf8"))?.[1] ?? "unknown"

export class BrokerError extends Data.TaggedError("BrokerError")<{
  readonly message: string
}> {}

export interface BrokerOptions {
  /** Port of the PLAINTEXT listener; a free loopback port when omitted. */
  readonly port?: number | undefined
  /** Where data and logs go; a fresh temporary directory (removed by `stop`) when omitted. */
  readonly dir?: string | undefined
  /** `auto.create.topics.enable`; off by default, as on most production clusters. */
  readonly autoCreateTopics?: boolean | undefined
  /** How long to wait for the broker to accept a topic creation. Default 120 s. */
  readonly readyTimeout?: Duration.Input | undefined
}

export interface Broker {
  /** `host:port`, the value for `KAFKA_BROKERS`. */
  readonly brokers: string
  readonly port: number
  readonly pid: number
  readonly dir: string
  readonly logFile: string
  /** True when `dir` was created by `start` and is removed by `stop`. */
  readonly ownsDir: boolean
}

const cacheRoot = () => Path.join(process.env.XDG_CACHE_HOME ?? Path.join(Os.homedir(), ".cache"), "kafka-effect")

const run = (file: string, args: ReadonlyArray<string>, options: { readonly cwd?: string } = {}) =>
  Effect.callback<string, BrokerError>((resume) => {
    const child = execFile(file, args, { ...options, maxBuffer: 64 * 1024 * 1024 }, (error, stdout, stderr) => {
      if (error) {
        const output = `${stdout}\n${stderr}`.trim().split("\n").slice(-30).join("\n")
        resume(
          Effect.fail(new BrokerError({ message: `${file} ${args.join(" ")} failed: ${error.message}\n${output}` }))
        )
      } else {
        resume(Effect.succeed(stdout))
      }
    })
    return Effect.sync(() => child.kill("SIGKILL"))
  })

/** The broker's jars, resolved by Maven once and cached by the hash of `pom.xml`. */
export const resolveJars: Effect.Effect<string, BrokerError> = Effect.gen(function* () {
  const pom = Fs.readFileSync(pomFile)
  const hash = createHash("sha256").update(pom).digest("hex").slice(0, 12)
  const jarsDir = Path.join(cacheRoot(), `kafka-jars-${hash}`)
  if (Fs.existsSync(Path.join(jarsDir, ".complete"))) return jarsDir
  yield* Effect.logInfo(`Resolving the Kafka broker's jars with Maven into ${jarsDir} (first run only)`)
  const staging = `${jarsDir}.${process.pid}.tmp`
  Fs.rmSync(staging, { recursive: true, force: true })
  yield* run("mvn", [
    "-q",
    "-B",
    "-f",
    pomFile,
    "dependency:copy-dependencies",
    `-DoutputDirectory=${staging}`,
    "-DincludeScope=runtime"
  ])
  Fs.writeFileSync(Path.join(staging, ".complete"), `${new Date().toISOString()}\n`)
  Fs.rmSync(jarsDir, { recursive: true, force: true })
  Fs.renameSync(staging, jarsDir)
  return jarsDir
})

const freePort = Effect.callback<number, BrokerError>((resume) => {
  const server = Net.createServer()
  server.once("error", (error) => resume(Effect.fail(new BrokerError({ message: `no free port: ${error.message}` }))))
  server.listen(0, "127.0.0.1", () => {
    const address = server.address()
    const port = typeof address === "object" && address !== null ? address.port : 0
    server.close(() => resume(Effect.succeed(port)))
  })
})

/** A Kafka cluster id: 16 random bytes, URL-safe base64 without padding (Kafka's `Uuid.toString`). */
const clusterId = () => randomBytes(16).toString("base64url")

const javaBin = () => (process.env.JAVA_HOME ? Path.join(process.env.JAVA_HOME, "bin", "java") : "java")

const jvmOptions = (jarsDir: string) => [
  "-Xms512m",
  "-Xmx1g",
  "-XX:+UseG1GC",
  "-XX:MaxGCPauseMillis=20",
  "-Djava.awt.headless=true",
  `-Dlog4j2.configurationFile=${log4jConfig}`,
  "-cp",
  `${jarsDir}/*`
]

const serverProperties = (options: {
  readonly dataDir: string
  readonly port: number
  readonly controllerPort: number
  readonly autoCreateTopics: boolean
}) =>
  [
    "process.roles=broker,controller",
    "node.id=1",
    `controller.quorum.voters=1@127.0.0.1:${options.controllerPort}`,
    `listeners=PLAINTEXT://127.0.0.1:${options.port},CONTROLLER://127.0.0.1:${options.controllerPort}`,
    `advertised.listeners=PLAINTEXT://127.0.0.1:${options.port}`,
    "controller.listener.names=CONTROLLER",
    "inter.broker.listener.name=PLAINTEXT",
    "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
    `log.dirs=${options.dataDir}`,
    "num.partitions=1",
    `auto.create.topics.enable=${options.autoCreateTopics}`,
    // A single node can only replicate once.
    "offsets.topic.replication.factor=1",
    "transaction.state.log.replication.factor=1",
    "transaction.state.log.min.isr=1",
    "share.coordinator.state.topic.replication.factor=1",
    "share.coordinator.state.topic.min.isr=1",
    // Fewer offsets partitions: the first group join creates them all, which is most of its latency here.
    "offsets.topic.num.partitions=10",
    // Groups form at once instead of after the default 3 s, so tests do not wait for nothing.
    "group.initial.rebalance.delay.ms=0",
    ""
  ].join("\n")

const isAlive = (pid: number) => {
  try {
    process.kill(pid, 0)
    return true
  } catch {
    return false
  }
}

/** True when `pid` is a live broker started from `dir`: a recycled PID never matches. */
const isBrokerOf = (pid: number, dir: string) => {
  if (!isAlive(pid)) return false
  try {
    return Fs.readFileSync(`/proc/${pid}/cmdline`, "utf8").includes(dir)
  } catch {
    return false
  }
}

const logTail = (logFile: string, lines = 40) => {
  try {
    return Fs.readFileSync(logFile, "utf8").trimEnd().split("\n").slice(-lines).join("\n")
  } catch {
    return "(no log)"
  }
}

/** Marks a directory that `start` created, so that a `stop` from another process removes it too. */
const ownedMarker = ".owned-by-kafka-effect"

class NotReady extends Data.TaggedError("NotReady")<{ readonly reason: string }> {}

/** Succeeds once a client can create (and then delete) a topic on `brokers`. */
const awaitReady = (broker: Broker, timeout: Duration.Input) =>
  Effect.gen(function* () {
    const kafka = new Kafka({
      clientId: "kafka-effect-broker-check",
      brokers: [broker.brokers],
      logLevel: logLevel.NOTHING,
      connectionTimeout: 1000,
      retry: { retries: 0 }
    })
    const topic = `__kafka_effect_ready_${randomBytes(4).toString("hex")}`
    const attempt = Effect.gen(function* () {
      if (!isAlive(broker.pid)) {
        return yield* new BrokerError({
          message: `the broker exited during start-up; its log ends with:\n${logTail(broker.logFile)}`
        })
      }
      yield* Effect.tryPromise({
        try: async () => {
          const admin = kafka.admin()
          await admin.connect()
          try {
            await admin.createTopics({ topics: [{ topic, numPartitions: 1 }], waitForLeaders: true })
            await admin.deleteTopics({ topics: [topic] })
          } finally {
            await admin.disconnect()
          }
        },
        catch: (cause) => new NotReady({ reason: cause instanceof Error ? cause.message : String(cause) })
      })
    })
    yield* attempt.pipe(
      Effect.retry({ schedule: Schedule.spaced("200 millis"), while: (error) => error._tag === "NotReady" }),
      Effect.catchTag("NotReady", (error) => Effect.fail(new BrokerError({ message: error.reason }))),
      Effect.timeoutOrElse({
        duration: timeout,
        orElse: () =>
          Effect.fail(
            new BrokerError({
              message: `the broker at ${broker.brokers} did not accept a topic within ${Duration.format(Duration.fromInputUnsafe(timeout))}; its log ends with:\n${logTail(broker.logFile)}`
            })
          )
      })
    )
  })

/**
 * Starts a broker and waits until it accepts a topic. The broker keeps running after this process exits;
 * stop it with `stop`. Prefer `acquire` inside a scope.
 */
export const start = (options: BrokerOptions = {}): Effect.Effect<Broker, BrokerError> =>
  Effect.gen(function* () {
    const jarsDir = yield* resolveJars
    const ownsDir = options.dir === undefined
    const dir = options.dir ?? Fs.mkdtempSync(Path.join(Os.tmpdir(), "kafka-effect-broker-"))
    Fs.mkdirSync(dir, { recursive: true })
    return yield* launch(dir, ownsDir, jarsDir, options).pipe(
      Effect.onError(() => Effect.sync(() => ownsDir && Fs.rmSync(dir, { recursive: true, force: true })))
    )
  })

const launch = (dir: string, ownsDir: boolean, jarsDir: string, options: BrokerOptions) =>
  Effect.gen(function* () {
    const dataDir = Path.join(dir, "data")
    const port = options.port ?? (yield* freePort)
    const controllerPort = yield* freePort
    const propertiesFile = Path.join(dir, "server.properties")
    Fs.writeFileSync(
      propertiesFile,
      serverProperties({ dataDir, port, controllerPort, autoCreateTopics: options.autoCreateTopics ?? false })
    )
    if (!Fs.existsSync(Path.join(dataDir, "meta.properties"))) {
      yield* run(javaBin(), [
        ...jvmOptions(jarsDir),
        "kafka.tools.StorageTool",
        "format",
        // One argument, `=`-joined: a cluster id may start with "-", which argparse would take for an option.
        `--cluster-id=${clusterId()}`,
        "--config",
        propertiesFile
      ])
    }
    const logFile = Path.join(dir, "broker.log")
    const out = Fs.openSync(logFile, "a")
    const child: ChildProcess = spawn(javaBin(), [...jvmOptions(jarsDir), "kafka.Kafka", propertiesFile], {
      detached: true,
      stdio: ["ignore", out, out]
    })
    Fs.closeSync(out)
    // A spawn failure is also emitted as an event; unhandled, it would crash the caller. `pid` tells us below.
    child.on("error", () => undefined)
    const pid = child.pid
    if (pid === undefined) {
      return yield* new BrokerError({ message: `could not start ${javaBin()}: is a JDK 17+ installed?` })
    }
    child.unref()
    Fs.writeFileSync(Path.join(dir, "broker.pid"), `${pid}\n`)
    if (ownsDir) Fs.writeFileSync(Path.join(dir, ownedMarker), "created by scripts/kafka/broker.ts; removed by stop\n")
    const broker: Broker = { brokers: `127.0.0.1:${port}`, port, pid, dir, logFile, ownsDir }
    yield* awaitReady(broker, options.readyTimeout ?? "120 seconds").pipe(Effect.onError(() => stop(broker)))
    return broker
  })

/**
 * Stops the broker by its own PID: SIGTERM, a controlled shutdown of up to 30 s, then SIGKILL.
 * Removes the directory when `start` created it.
 */
export const stop = (broker: Pick<Broker, "pid" | "dir" | "ownsDir">): Effect.Effect<void> =>
  Effect.gen(function* () {
    if (isBrokerOf(broker.pid, broker.dir)) {
      process.kill(broker.pid, "SIGTERM")
      const exited = yield* Effect.sync(() => !isAlive(broker.pid)).pipe(
        Effect.repeat({ schedule: Schedule.spaced("100 millis"), until: (gone) => gone }),
        Effect.timeoutOrElse({ duration: "30 seconds", orElse: () => Effect.succeed(false) })
      )
      if (!exited && isBrokerOf(broker.pid, broker.dir)) {
        yield* Effect.logWarning(`broker ${broker.pid} ignored SIGTERM for 30 s; sending SIGKILL`)
        process.kill(broker.pid, "SIGKILL")
      }
    }
    if (broker.ownsDir) Fs.rmSync(broker.dir, { recursive: true, force: true })
  })

/** A broker for the life of the scope. */
export const acquire = (options: BrokerOptions = {}): Effect.Effect<Broker, BrokerError, Scope.Scope> =>
  Effect.acquireRelease(start(options), stop)

/** Reads what `start` left in `dir`, for a later `stop` from another process. */
export const fromDir = (dir: string): Effect.Effect<Broker, BrokerError> =>
  Effect.try({
    try: () => {
      const pid = Number(Fs.readFileSync(Path.join(dir, "broker.pid"), "utf8").trim())
      const properties = Fs.readFileSync(Path.join(dir, "server.properties"), "utf8")
      const port = Number(/advertised\.listeners=PLAINTEXT:\/\/[^:]+:(\d+)/.exec(properties)?.[1])
      const ownsDir = Fs.existsSync(Path.join(dir, ownedMarker))
      return { brokers: `127.0.0.1:${port}`, port, pid, dir, logFile: Path.join(dir, "broker.log"), ownsDir }
    },
    catch: (cause) => new BrokerError({ message: `no broker in ${dir}: ${String(cause)}` })
  })
