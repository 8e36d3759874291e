/**
 * What the cluster tests share: a plain kafkajs admin (independent of the code under test), topics created and
 * waited for on every node, the leader of a partition and the group coordinator's node, polling on events, and the
 * processes' logs kept when a test fails.
 */
import * as Fs from "node:fs"
import * as Os from "node:os"
import * as Path from "node:path"
import { type Duration, Effect, Exit, Schedule } from "effect"
import { Kafka, logLevel } from "kafkajs"
import * as Program from "../../scripts/program.ts"
import { eventually as eventuallyWithin } from "../support/kafka.ts"

export const producerProcess = Path.join(Program.root, "test", "support", "producerProcess.ts")

export const admin = async <A>(brokers: string, use: (admin: ReturnType<Kafka["admin"]>) => Promise<A>) => {
  const kafka = new Kafka({
    clientId: "kafka-effect-cluster-test",
    brokers: brokers.split(","),
    logLevel: logLevel.NOTHING,
    retry: { retries: 8, initialRetryTime: 200, maxRetryTime: 2_000 }
  })
  const client = kafka.admin()
  await client.connect()
  try {
    return await use(client)
  } finally {
    await client.disconnect()
  }
}

/**
 * Creates a topic and waits until every node can answer for each partition: a node that has not caught up with the
 * controller's metadata yet answers "does not host this topic-partition" for a moment.
 */
export const createReplicated = (brokers: string, topic: string, partitions: number) =>
  Effect.promise(() =>
    admin(brokers, (client) =>
      // Not waiting for leaders here: kafkajs asks one node, which may not have caught up yet; waited for below.
      client.createTopics({ topics: [{ topic, numPartitions: partitions }], waitForLeaders: false })
    )
  ).pipe(
    Effect.andThen(
      eventually(
        Effect.promise(() =>
          admin(brokers, async (client) => {
            const metadata = await client.fetchTopicMetadata({ topics: [topic] })
            const found = metadata.topics[0]?.partitions ?? []
            return (
              found.length === partitions && found.every((p) => p.leader >= 0 && p.isr.length === p.replicas.length)
            )
          }).catch(() => false)
        ),
        `${topic}'s partitions to have leaders and full in-sync replicas`
      )
    )
  )

/** The leader of a partition, asked until a node answers. */
export const leaderOf = (brokers: string, topic: string, partition: number) =>
  Effect.promise(() =>
    admin(brokers, async (client) => {
      const metadata = await client.fetchTopicMetadata({ topics: [topic] })
      return metadata.topics[0]?.partitions.find((p) => p.partitionId === partition)?.leader ?? -1
    }).catch(() => -1)
  ).pipe(
    Effect.repeat({ schedule: Schedule.spaced("200 millis"), until: (leader) => leader >= 0 }),
    Effect.timeoutOrElse({ duration: "60 seconds", orElse: () => Effect.die(new Error(`no leader for ${topic}`)) })
  )

/** When the test fails, writes a process's log to a file in the OS's temp directory and says where. */
export const keepLogOnFailure = (name: string, log: () => string) =>
  Effect.addFinalizer((exit) =>
    Exit.isFailure(exit)
      ? Effect.sync(() => {
          const file = Path.join(Os.tmpdir(), `${name}.log`)
          Fs.writeFileSync(file, log())
          console.error(`${name}'s log: ${file}`)
        })
      : Effect.void
  )

/** `eventually` (test/support/kafka.ts) with a cluster's patience: 90 s unless told. */
export const eventually = <E, R>(
  check: Effect.Effect<boolean, E, R>,
  what: string,
  timeout: Duration.Input = "90 seconds"
) => eventuallyWithin(check, what, timeout)

/** Java's `String.hashCode`, which the broker uses to place a group on a partition of `__consumer_offsets`. */
const javaHashCode = (text: string) => {
  let hash = 0
  for (let i = 0; i < text.length; i++) hash = (Math.imul(hash, 31) + text.charCodeAt(i)) | 0
  return hash
}

/**
 * The node that coordinates `groupId`: the leader of the group's `__consumer_offsets` partition
 * (`abs(hashCode) % partitions`, as the broker places it), asked until a node answers.
 */
export const coordinatorOf = (brokers: string, groupId: string) =>
  Effect.promise(() =>
    admin(brokers, async (client) => {
      const metadata = await client.fetchTopicMetadata({ topics: ["__consumer_offsets"] })
      const partitions = metadata.topics[0]?.partitions ?? []
      if (partitions.length === 0) return -1
      const partition = (javaHashCode(groupId) & 0x7fffffff) % partitions.length
      return partitions.find((p) => p.partitionId === partition)?.leader ?? -1
    }).catch(() => -1)
  ).pipe(
    Effect.repeat({ schedule: Schedule.spaced("200 millis"), until: (leader) => leader >= 0 }),
    Effect.timeoutOrElse({
      duration: "60 seconds",
      orElse: () => Effect.die(new Error(`no coordinator for ${groupId}`))
    })
  )

/**
 * Waits until every partition of every topic has all its replicas in sync: what an operator waits for between the
 * nodes of a rolling restart (no under-replicated partitions), so that the next node down leaves two in sync.
 */
export const awaitInSync = (brokers: string, timeout: Duration.Input = "120 seconds") =>
  eventually(
    Effect.promise(() =>
      admin(brokers, async (client) => {
        const metadata = await client.fetchTopicMetadata()
        return metadata.topics.every((topic) =>
          topic.partitions.every((p) => p.leader >= 0 && p.isr.length === p.replicas.length)
        )
      }).catch(() => false)
    ),
    "every partition to have all its replicas in sync",
    timeout
  )

/** The outcome lines of a producer process (test/support/producerProcess.ts), as they are now. */
export const producerLines = (producer: Program.Program) => {
  const lines = producer.output().stdout.split("\n")
  const acked = lines.filter((line) => line.startsWith("acked ")).map((line) => line.split(" ")[1] as string)
  const failed = lines.filter((line) => line.startsWith("failed "))
  const done = lines.find((line) => line.startsWith("done "))
  return { acked, failed, begun: done === undefined ? undefined : Number(done.split(" ")[1]) }
}

/** The events the consumer program logged as processed (LOG_LEVEL=debug, LOG_FORMAT=json): id and attempt. */
export const processedEvents = (stderr: string) => {
  const events: Array<{ readonly id: string; readonly attempt: number }> = []
  for (const line of stderr.split("\n")) {
    if (!line.startsWith("{")) continue
    const log = JSON.parse(line) as { message?: unknown; annotations?: Record<string, unknown> }
    if (String(log.message).startsWith("processed ") && typeof log.annotations?.id === "string") {
      events.push({ id: log.annotations.id, attempt: Number(log.annotations.attempt ?? 0) })
    }
  }
  return events
}

/** The ids of the events the consumer program logged as processed. */
export const processedIds = (stderr: string) => processedEvents(stderr).map((event) => event.id)

/** The `id` of each event, from records whose values are events (src/Event.ts). */
export const eventIds = (records: ReadonlyArray<{ readonly value: string | null }>) =>
  records.map((record) => (JSON.parse(record.value ?? "{}") as { id: string }).id)

/**
 * A producer process (test/support/producerProcess.ts) sending `rate` events/s to `topic` (acks=all, idempotent, 50
 * retries) until its stdin is ended with `stop`: it runs for as long as a scenario lasts, whatever the machine's
 * speed. Killed when the scope closes; its log is kept if the test fails.
 */
export const pacedProducer = (engine: string, brokers: string, topic: string, rate: number) =>
  Effect.gen(function* () {
    const producer = Program.start(producerProcess, {
      env: {
        KAFKA_CLIENT: engine,
        KAFKA_BROKERS: brokers,
        KAFKA_RECONNECT_BACKOFF_MAX_MS: "1000",
        KAFKA_PRODUCER_TOPIC: topic,
        KAFKA_PRODUCER_RETRIES: "50",
        LOG_LEVEL: "warn",
        LOG_FORMAT: "json",
        COUNT: "10000000",
        RATE: String(rate),
        UNTIL_STDIN_ENDS: "true"
      },
      stdin: "",
      keepStdinOpen: true
    })
    yield* Effect.addFinalizer(() => Effect.sync(() => producer.child.kill("SIGKILL")))
    yield* keepLogOnFailure(`${topic}-producer`, () => producer.output().stderr)
    return { ...producer, stop: () => producer.child.stdin?.end() }
  })

/**
 * The environment of a consumer-group member process (test/support/members.ts) on the cluster: `engine`, `topic`
 * and `groupId`, 8 workers, a 10 s session with 500 ms heartbeats, commits every `commitMs`, a handler that waits
 * `handlerMs` a record.
 */
export const memberEnv = (
  engine: string,
  brokers: string,
  topic: string,
  groupId: string,
  { commitMs, handlerMs }: { readonly commitMs: number; readonly handlerMs: number }
) => ({
  KAFKA_CLIENT: engine,
  KAFKA_BROKERS: brokers,
  KAFKA_RECONNECT_BACKOFF_MAX_MS: "1000",
  KAFKA_CONSUMER_TOPIC: topic,
  KAFKA_CONSUMER_GROUP_ID: groupId,
  KAFKA_CONSUMER_WORKERS: "8",
  KAFKA_CONSUMER_SESSION_TIMEOUT_MS: "10000",
  KAFKA_CONSUMER_HEARTBEAT_INTERVAL_MS: "500",
  KAFKA_CONSUMER_COMMIT_INTERVAL_MS: String(commitMs),
  HANDLER_DELAY_MS: String(handlerMs)
})
