/**
 * A real single-node Apache Kafka broker (KRaft, combined broker + controller) for the tests, the benchmarks
 * and the demo, started from Maven Central artifacts with the machine's JDK. No Docker.
 *
 * - `resolveJars` runs `mvn dependency:copy-dependencies` on `pom.xml` once and caches the jars under
 *   `$XDG_CACHE_HOME/kafka-effect` (or `~/.cache/kafka-effect`), keyed by the pom's hash.
 * - `start` formats storage in a fresh directory with `kafka.tools.StorageTool`, starts `kafka.Kafka` detached,
 *   and returns only once a client can create a topic.
 * - With `sasl` and `tls`, it also listens for SASL (SCRAM-SHA-256, SCRAM-SHA-512, PLAIN) and for TLS on ports of
 *   their own, so that tests can prove authentication and encryption against a real broker. PLAINTEXT stays the
 *   listener for the readiness check and for the broker's own traffic.
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
import { Data, Duration, Effect, Exit, Schedule, Scope } from "effect"
import { Kafka, logLevel } from "kafkajs"

const here = Path.dirname(new URL(import.meta.url).pathname)
const pomFile = Path.join(here, "pom.xml")
const log4jConfig = Path.join(here, "log4j2.properties")
const toolsLog4jConfig = Path.join(here, "log4j2-tools.properties")

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
  /**
   * A `SASL_PLAINTEXT` listener on a free loopback port, accepting these users with SCRAM-SHA-256, SCRAM-SHA-512
   * and PLAIN. The SCRAM credentials are written when storage is formatted, so a reused `dir` keeps its first users.
   *
   * @example
   * Broker.acquire({ sasl: { users: [{ username: "alice", password: "alice-secret" }] } })
   */
  readonly sasl?: { readonly users: ReadonlyArray<SaslUser> } | undefined
  /**
   * An `SSL` listener on a free loopback port, with a certificate for `localhost` and `127.0.0.1` signed by a CA
   * generated at start (needs `openssl`); clients trust `Broker.caFile`. No client certificate is asked for.
   */
  readonly tls?: true | undefined
  /**
   * The broker's JVM: `"lean"` (the default: the C1 compiler only and the serial collector, for test and
   * development brokers, which start in about half the CPU time and idle at half) or `"server"` (G1 and the
   * optimising C2 compiler, as production runs Kafka: what the benchmarks measure against).
   */
  readonly jvm?: JvmProfile | undefined
}

export type JvmProfile = "lean" | "server"

export interface SaslUser {
  /** Letters, digits, `.`, `_` and `-`: the name is also a JAAS option name (`user_<name>`) for PLAIN. */
  readonly username: string
  /** Printable ASCII without `"`, `\`, `,`, `=`, `[` or `]`, which the JAAS and `--add-scram` syntaxes reserve. */
  readonly password: string
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
  /** `host:port` of the `SASL_PLAINTEXT` listener, when started with `sasl`. */
  readonly saslBrokers?: string
  /** `host:port` of the `SSL` listener, when started with `tls`. */
  readonly tlsBrokers?: string
  /** The PEM of the CA that signed the `SSL` listener's certificate, for a client's `ssl: { ca: [pem] }`. */
  readonly caFile?: string
}

const cacheRoot = () => Path.join(process.env.XDG_CACHE_HOME ?? Path.join(Os.homedir(), ".cache"), "kafka-effect")

export const run = (
  file: string,
  args: ReadonlyArray<string>,
  options: { readonly cwd?: string; readonly stdin?: string | Buffer | undefined } = {}
) =>
  Effect.callback<string, BrokerError>((resume) => {
    const child = execFile(
      file,
      args,
      { ...(options.cwd !== undefined && { cwd: options.cwd }), maxBuffer: 64 * 1024 * 1024 },
      (error, stdout, stderr) => {
        if (error) {
          const output = `${stdout}\n${stderr}`.trim().split("\n").slice(-30).join("\n")
          resume(
            Effect.fail(new BrokerError({ message: `${file} ${args.join(" ")} failed: ${error.message}\n${output}` }))
          )
        } else {
          resume(Effect.succeed(stdout))
        }
      }
    )
    child.stdin?.on("error", () => {})
    child.stdin?.end(options.stdin)
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

/** The JDK that `javaBin` runs, as a short key: its resolved path, size and time, so another JDK gets its own archive. */
const javaKey = (() => {
  let key: string | undefined
  return () => {
    if (key !== undefined) return key
    const bin = javaBin()
    const found = Path.isAbsolute(bin)
      ? bin
      : (process.env.PATH ?? "")
          .split(Path.delimiter)
          .map((dir) => Path.join(dir, bin))
          .find((file) => Fs.existsSync(file))
    let identity = bin
    try {
      if (found !== undefined) {
        const real = Fs.realpathSync(found)
        const stat = Fs.statSync(real)
        identity = `${real}:${stat.size}:${stat.mtimeMs}`
      }
    } catch {}
    key = createHash("sha256").update(identity).digest("hex").slice(0, 8)
    return key
  }
})()

/**
 * Class-data sharing for the JVMs of the broker's jars: the classes a broker loads, archived by the first broker
 * that stops cleanly (`-XX:ArchiveClassesAtExit`, published by `stop`) and mapped by every later JVM of the same
 * jars and JDK, which then starts in about half the CPU (measured: 2.1 → 1.1 CPU-s to a ready broker, 1.3 → 0.6 for
 * a storage format). An archive the JVM cannot use is skipped with a warning, on stderr: tools' stdout stays theirs.
 */
const classArchive = (jarsDir: string) => `${jarsDir}.jdk-${javaKey()}.jsa`
const dumpedArchive = (dir: string) => Path.join(dir, "classes.jsa")
const archiveTarget = (dir: string) => Path.join(dir, "classes.jsa.target")

const classSharing = (jarsDir: string, dumpInto?: string): ReadonlyArray<string> => {
  const archive = classArchive(jarsDir)
  const quiet = ["-Xlog:disable", "-Xlog:all=warning:stderr"]
  if (Fs.existsSync(archive)) return [...quiet, `-XX:SharedArchiveFile=${archive}`]
  if (dumpInto === undefined) return quiet
  Fs.writeFileSync(archiveTarget(dumpInto), archive)
  return [...quiet, `-XX:ArchiveClassesAtExit=${dumpedArchive(dumpInto)}`]
}

/**
 * After a broker that was dumping its classes exited by itself: its archive becomes the shared one (atomically),
 * unless another broker's got there first. The broker's own copy (about 50 MB) is removed either way.
 */
const publishArchive = (dir: string) => {
  const dumped = dumpedArchive(dir)
  try {
    if (!Fs.existsSync(dumped) || !Fs.existsSync(archiveTarget(dir))) return
    const archive = Fs.readFileSync(archiveTarget(dir), "utf8")
    if (Fs.existsSync(archive)) return
    const staging = `${archive}.${process.pid}.${randomBytes(4).toString("hex")}.tmp`
    Fs.copyFileSync(dumped, staging)
    Fs.renameSync(staging, archive)
  } catch {
    // Only a speed-up: the next broker dumps again.
  } finally {
    Fs.rmSync(dumped, { force: true })
    Fs.rmSync(archiveTarget(dir), { force: true })
  }
}

export const freePort = Effect.callback<number, BrokerError>((resume) => {
  const server = Net.createServer()
  server.once("error", (error) => resume(Effect.fail(new BrokerError({ message: `no free port: ${error.message}` }))))
  server.listen(0, "127.0.0.1", () => {
    const address = server.address()
    const port = typeof address === "object" && address !== null ? address.port : 0
    server.close(() => resume(Effect.succeed(port)))
  })
})

/**
 * Runs one of Kafka's own command-line tools (a class of kafka-tools, say
 * `org.apache.kafka.tools.ConsoleProducer`) from the broker's jars, with `stdin` as its input; succeeds with what it
 * printed on stdout. For tests that need records written, or read, by the Java client itself.
 */
export const tool = (mainClass: string, args: ReadonlyArray<string>, options: { readonly stdin?: string } = {}) =>
  Effect.flatMap(resolveJars, (jarsDir) =>
    run(
      javaBin(),
      [
        "-Xmx256m",
        "-XX:TieredStopAtLevel=1",
        ...classSharing(jarsDir),
        "-Djava.awt.headless=true",
        `-Dlog4j2.configurationFile=${toolsLog4jConfig}`,
        "-cp",
        `${jarsDir}/*`,
        mainClass,
        ...args
      ],
      { stdin: options.stdin }
    )
  )

/** A Kafka cluster id: 16 random bytes, URL-safe base64 without padding (Kafka's `Uuid.toString`). */
export const clusterId = () => randomBytes(16).toString("base64url")

export const javaBin = () => (process.env.JAVA_HOME ? Path.join(process.env.JAVA_HOME, "bin", "java") : "java")

/**
 * How a JVM of the broker's jars is run. `lean` stops at the C1 compiler and collects with the serial collector: on
 * a two-core machine running many short-lived brokers, C2's compilations and G1's threads were most of a broker's
 * CPU (measured on a 300,000-record load: 3.8 CPU-s to start and 6.7 to serve with G1 and C2, 2.1 and 2.4 lean, and
 * half the CPU when idle). `server` is how production runs Kafka.
 */
export const jvmOptions = (
  jarsDir: string,
  options: {
    readonly heap?: { readonly min: string; readonly max: string } | undefined
    readonly profile?: JvmProfile | undefined
    /** a broker's directory: with no shared archive yet, the JVM archives its classes there when it exits */
    readonly dumpInto?: string | undefined
  } = {}
) => [
  `-Xms${options.heap?.min ?? "512m"}`,
  `-Xmx${options.heap?.max ?? "1g"}`,
  ...(options.profile === "server"
    ? ["-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20"]
    : ["-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", ...classSharing(jarsDir, options.dumpInto)]),
  "-Djava.awt.headless=true",
  `-Dlog4j2.configurationFile=${log4jConfig}`,
  "-cp",
  `${jarsDir}/*`
]

/** The mechanisms of the `SASL_PLAINTEXT` listener; the SCRAM ones need credentials in the metadata log. */
const saslMechanisms = ["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"] as const
const scramMechanisms = saslMechanisms.filter((mechanism) => mechanism.startsWith("SCRAM-"))

interface SaslListener {
  readonly port: number
  readonly users: ReadonlyArray<SaslUser>
}

interface TlsListener {
  readonly port: number
  readonly keystoreFile: string
  readonly keystorePassword: string
}

/** The users, or a BrokerError naming the first whose name or password the configuration syntaxes cannot carry. */
const validSaslUsers = (users: ReadonlyArray<SaslUser>) =>
  Effect.as(
    Effect.forEach(users, ({ username, password }) =>
      /^[A-Za-z0-9._-]+$/.test(username) && /^[\x21-\x7e]+$/.test(password) && !/["\\,=[\]]/.test(password)
        ? Effect.void
        : Effect.fail(
            new BrokerError({
              message: `SASL user ${JSON.stringify(username)}: a name is letters, digits, ".", "_" and "-"; a password is printable ASCII without '"', '\\', ',', '=', '[' or ']'`
            })
          )
    ),
    users
  )

/** One `--add-scram` per user and SCRAM mechanism: KRaft keeps SCRAM credentials in the metadata log. */
const addScramArguments = (sasl: SaslListener | undefined) =>
  (sasl?.users ?? []).flatMap(({ username, password }) =>
    scramMechanisms.flatMap((mechanism) => ["--add-scram", `${mechanism}=[name=${username},password=${password}]`])
  )

const serverProperties = (options: {
  readonly dataDir: string
  readonly port: number
  readonly controllerPort: number
  readonly autoCreateTopics: boolean
  readonly sasl: SaslListener | undefined
  readonly tls: TlsListener | undefined
}) => {
  const { sasl, tls } = options
  const plaintext = `PLAINTEXT://127.0.0.1:${options.port}`
  const secured = [
    ...(sasl ? [`SASL_PLAINTEXT://127.0.0.1:${sasl.port}`] : []),
    ...(tls ? [`SSL://127.0.0.1:${tls.port}`] : [])
  ]
  return [
    "process.roles=broker,controller",
    "node.id=1",
    `controller.quorum.voters=1@127.0.0.1:${options.controllerPort}`,
    `listeners=${[plaintext, `CONTROLLER://127.0.0.1:${options.controllerPort}`, ...secured].join(",")}`,
    `advertised.listeners=${[plaintext, ...secured].join(",")}`,
    "controller.listener.names=CONTROLLER",
    "inter.broker.listener.name=PLAINTEXT",
    `listener.security.protocol.map=${[
      "PLAINTEXT:PLAINTEXT",
      "CONTROLLER:PLAINTEXT",
      ...(sasl ? ["SASL_PLAINTEXT:SASL_PLAINTEXT"] : []),
      ...(tls ? ["SSL:SSL"] : [])
    ].join(",")}`,
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
    ...(sasl ? saslProperties(sasl) : []),
    ...(tls ? tlsProperties(tls) : []),
    ""
  ].join("\n")
}

/**
 * Per-listener settings (`listener.name.<lower-case listener>.…`), so the PLAINTEXT and CONTROLLER listeners are
 * untouched. SCRAM checks passwords against the metadata log; PLAIN against the `user_<name>` JAAS options.
 */
const saslProperties = (sasl: SaslListener) => [
  `listener.name.sasl_plaintext.sasl.enabled.mechanisms=${saslMechanisms.join(",")}`,
  ...scramMechanisms.map(
    (mechanism) =>
      `listener.name.sasl_plaintext.${mechanism.toLowerCase()}.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;`
  ),
  `listener.name.sasl_plaintext.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required${sasl.users
    .map(({ username, password }) => ` user_${username}="${password}"`)
    .join("")};`
]

const tlsProperties = (tls: TlsListener) => [
  "listener.name.ssl.ssl.keystore.type=PKCS12",
  `listener.name.ssl.ssl.keystore.location=${tls.keystoreFile}`,
  `listener.name.ssl.ssl.keystore.password=${tls.keystorePassword}`,
  `listener.name.ssl.ssl.key.password=${tls.keystorePassword}`,
  "listener.name.ssl.ssl.client.auth=none"
]

/** `openssl req` needs a config; this one, rather than the system's, decides the certificates' extensions. */
const opensslConfig = [
  "[req]",
  "distinguished_name = dn",
  "[dn]",
  "[ca_extensions]",
  "basicConstraints = critical, CA:TRUE",
  "keyUsage = critical, keyCertSign, cRLSign",
  "subjectKeyIdentifier = hash",
  "[server_extensions]",
  "basicConstraints = critical, CA:FALSE",
  "keyUsage = critical, digitalSignature",
  "extendedKeyUsage = serverAuth",
  "subjectAltName = DNS:localhost, IP:127.0.0.1",
  "subjectKeyIdentifier = hash",
  "authorityKeyIdentifier = keyid",
  ""
].join("\n")

/**
 * A fresh CA and a server certificate it signs (CN and SAN `localhost`, SAN IP `127.0.0.1`), P-256 keys, in
 * `tlsDir`: `ca.pem` for clients, `server.p12` (certificate, key and CA chain) for the broker.
 */
const generateCertificates = (tlsDir: string) =>
  Effect.gen(function* () {
    Fs.mkdirSync(tlsDir, { recursive: true })
    const file = (name: string) => Path.join(tlsDir, name)
    Fs.writeFileSync(file("openssl.cnf"), opensslConfig)
    const newKey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    const days = ["-days", "365"]
    yield* run("openssl", [
      "req",
      "-config",
      file("openssl.cnf"),
      "-x509",
      ...newKey,
      ...days,
      "-subj",
      "/CN=kafka-effect test CA",
      "-extensions",
      "ca_extensions",
      "-keyout",
      file("ca.key"),
      "-out",
      file("ca.pem")
    ])
    yield* run("openssl", [
      "req",
      "-config",
      file("openssl.cnf"),
      "-new",
      ...newKey,
      "-subj",
      "/CN=localhost",
      "-keyout",
      file("server.key"),
      "-out",
      file("server.csr")
    ])
    yield* run("openssl", [
      "x509",
      "-req",
      "-in",
      file("server.csr"),
      "-CA",
      file("ca.pem"),
      "-CAkey",
      file("ca.key"),
      "-set_serial",
      `0x${randomBytes(8).toString("hex")}`,
      ...days,
      "-extfile",
      file("openssl.cnf"),
      "-extensions",
      "server_extensions",
      "-out",
      file("server.pem")
    ])
    const keystorePassword = randomBytes(12).toString("hex")
    yield* run("openssl", [
      "pkcs12",
      "-export",
      "-in",
      file("server.pem"),
      "-inkey",
      file("server.key"),
      "-certfile",
      file("ca.pem"),
      "-name",
      "localhost",
      "-passout",
      `pass:${keystorePassword}`,
      "-out",
      file("server.p12")
    ])
    return { caFile: file("ca.pem"), keystoreFile: file("server.p12"), keystorePassword }
  }).pipe(
    Effect.mapError(
      (error) =>
        new BrokerError({ message: `generating the TLS listener's certificates (needs openssl): ${error.message}` })
    )
  )

export const isAlive = (pid: number) => {
  try {
    process.kill(pid, 0)
    return true
  } catch {
    return false
  }
}

/** True when `pid` is a live broker started from `dir`: a recycled PID never matches. */
export const isBrokerOf = (pid: number, dir: string) => {
  if (!isAlive(pid)) return false
  try {
    return Fs.readFileSync(`/proc/${pid}/cmdline`, "utf8").includes(dir)
  } catch {
    return false
  }
}

export const logTail = (logFile: string, lines = 40) => {
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
 * stop it with `stop`. Prefer `acquire` inside a scope. Failed or interrupted part way, it stops what it started.
 */
export const start = (options: BrokerOptions = {}): Effect.Effect<Broker, BrokerError> =>
  Effect.flatMap(Scope.make(), (scope) =>
    acquire(options).pipe(
      Scope.provide(scope),
      // Left open on success: the broker outlives the effect, as `start` promises.
      Effect.onExit((exit) => (Exit.isSuccess(exit) ? Effect.void : Scope.close(scope, exit)))
    )
  )

/**
 * A broker for the life of the scope. Starting it can be interrupted at any point (a signal during a slow start):
 * the JVM's stop is registered in the same uninterruptible step that spawns it, so no path leaves it running.
 */
export const acquire = (options: BrokerOptions = {}): Effect.Effect<Broker, BrokerError, Scope.Scope> =>
  Effect.gen(function* () {
    const jarsDir = yield* resolveJars
    const ownsDir = options.dir === undefined
    const dir = yield* Effect.acquireRelease(
      Effect.sync(() => {
        const dir = options.dir ?? Fs.mkdtempSync(Path.join(Os.tmpdir(), "kafka-effect-broker-"))
        Fs.mkdirSync(dir, { recursive: true })
        return dir
      }),
      (dir) => Effect.sync(() => ownsDir && Fs.rmSync(dir, { recursive: true, force: true }))
    )
    return yield* launch(dir, ownsDir, jarsDir, options)
  })

const launch = (dir: string, ownsDir: boolean, jarsDir: string, options: BrokerOptions) =>
  Effect.gen(function* () {
    const dataDir = Path.join(dir, "data")
    const port = options.port ?? (yield* freePort)
    const controllerPort = yield* freePort
    const sasl: SaslListener | undefined = options.sasl
      ? { users: yield* validSaslUsers(options.sasl.users), port: yield* freePort }
      : undefined
    const tls = options.tls
      ? { port: yield* freePort, ...(yield* generateCertificates(Path.join(dir, "tls"))) }
      : undefined
    const propertiesFile = Path.join(dir, "server.properties")
    Fs.writeFileSync(
      propertiesFile,
      serverProperties({
        dataDir,
        port,
        controllerPort,
        autoCreateTopics: options.autoCreateTopics ?? false,
        sasl,
        tls
      })
    )
    if (!Fs.existsSync(Path.join(dataDir, "meta.properties"))) {
      yield* run(javaBin(), [
        ...jvmOptions(jarsDir),
        "kafka.tools.StorageTool",
        "format",
        // One argument, `=`-joined: a cluster id may start with "-", which argparse would take for an option.
        `--cluster-id=${clusterId()}`,
        "--config",
        propertiesFile,
        ...addScramArguments(sasl)
      ])
    }
    const logFile = Path.join(dir, "broker.log")
    const broker = yield* Effect.acquireRelease(
      spawnBroker({ dir, ownsDir, jarsDir, propertiesFile, logFile, port, sasl, tls, jvm: options.jvm ?? "lean" }),
      stop
    )
    yield* awaitReady(broker, options.readyTimeout ?? "120 seconds")
    return broker
  })

/** Spawns `kafka.Kafka` detached (it outlives this process until `stop`) and records its PID in `dir`. */
const spawnBroker = (options: {
  readonly dir: string
  readonly ownsDir: boolean
  readonly jarsDir: string
  readonly propertiesFile: string
  readonly logFile: string
  readonly port: number
  readonly sasl: SaslListener | undefined
  readonly tls: (TlsListener & { readonly caFile: string }) | undefined
  readonly jvm: JvmProfile
}) =>
  Effect.gen(function* () {
    const { dir, ownsDir, jarsDir, propertiesFile, logFile, port, sasl, tls, jvm } = options
    const out = Fs.openSync(logFile, "a")
    const args = [...jvmOptions(jarsDir, { profile: jvm, dumpInto: dir }), "kafka.Kafka", propertiesFile]
    const child: ChildProcess = spawn(javaBin(), args, {
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
    const broker: Broker = {
      brokers: `127.0.0.1:${port}`,
      port,
      pid,
      dir,
      logFile,
      ownsDir,
      ...(sasl ? { saslBrokers: `127.0.0.1:${sasl.port}` } : {}),
      ...(tls ? { tlsBrokers: `127.0.0.1:${tls.port}`, caFile: tls.caFile } : {})
    }
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
      } else publishArchive(broker.dir)
    }
    if (broker.ownsDir) Fs.rmSync(broker.dir, { recursive: true, force: true })
  })

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
