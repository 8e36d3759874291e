/**
 * The consumer program as a deployment runs it: several replicas started at the same moment, each creating the
 * topics it needs (KAFKA_CREATE_TOPICS=true). They race to create the same topics, and a broker answers for a new
 * topic's partitions only once it hosts them: every replica must come up and consume all the same.
 */
import * as Path from "node:path"
import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import { inject } from "vitest"
import * as Program from "../scripts/program.ts"
import { eventually } from "./support/http.ts"
import { awaitCommittedToEnd, consumerProgramEnv, uniqueName } from "./support/kafka.ts"

const brokers = inject("kafkaBrokers")

/** Starts the programs at once, waits until each consumes, produces 1,000 events to each topic, and stops them. */
const startTogether = (
  members: ReadonlyArray<{
    readonly topic: string
    readonly groupId: string
    readonly env?: Record<string, string> | undefined
  }>
) =>
  Effect.gen(function* () {
    const programs = members.map((member) => ({
      ...member,
      program: Program.start(Program.consumerProgram, {
        env: consumerProgramEnv(brokers, member.topic, { KAFKA_CONSUMER_GROUP_ID: member.groupId, ...member.env })
      })
    }))
    return yield* Effect.gen(function* () {
      for (const { program, topic } of programs) {
        yield* eventually(
          Effect.sync(() => ({ out: program.output().stderr, exited: program.child.exitCode })),
          ({ out, exited }) => {
            if (exited !== null) throw new Error(`a consumer of ${topic} exited with ${exited}:\n${out.slice(-3000)}`)
            return out.includes(`"consuming ${topic} as `)
          },
          `the consumer of ${topic} to come up`,
          "90 seconds"
        )
      }
      for (const topic of new Set(members.map((member) => member.topic))) {
        const produced = yield* Program.run(Path.join(Program.root, "src", "producer.ts"), {
          args: ["--count", "1000", "--rate", "0"],
          env: { KAFKA_BROKERS: brokers, KAFKA_PRODUCER_TOPIC: topic }
        })
        assert.strictEqual(produced.exitCode, 0, produced.stderr)
      }
      for (const { topic, groupId } of members) yield* awaitCommittedToEnd(brokers, groupId, topic, "90 seconds")
      for (const { program } of programs) program.child.kill("SIGTERM")
      const done = []
      for (const { program } of programs) {
        const exitCode = yield* program.exited
        const { stdout, stderr } = program.output()
        assert.strictEqual(exitCode, 0, stderr.slice(-2000))
        done.push(Number(/summary: \{"done":(\d+)/.exec(stdout)?.[1] ?? Number.NaN))
      }
      return done
    }).pipe(
      Effect.ensuring(
        Effect.sync(() => {
          for (const { program } of programs) program.child.kill("SIGKILL")
        })
      )
    )
  })

describe("consumer programs started together", () => {
  it.live(
    "four replicas on the same fresh topics all come up, create what is missing, and share the work",
    () =>
      Effect.gen(function* () {
        const topic = uniqueName("replicas")
        const groupId = `${topic}-group`
        const done = yield* startTogether(Array.from({ length: 4 }, () => ({ topic, groupId })))
        assert.strictEqual(
          done.reduce((a, b) => a + b, 0),
          1000,
          `every event handled once: ${done}`
        )
      }),
    240_000
  )

  it.live(
    "four programs on four different fresh topics all come up and consume",
    () =>
      Effect.gen(function* () {
        const members = Array.from({ length: 4 }, (_, i) => {
          const topic = uniqueName(`apart-${i}`)
          return { topic, groupId: `${topic}-group` }
        })
        const done = yield* startTogether(members)
        assert.deepStrictEqual(done, [1000, 1000, 1000, 1000])
      }),
    240_000
  )

  it.live(
    "two replicas with KIP-848's group protocol (platformatic) come up together and handle every event once",
    () =>
      Effect.gen(function* () {
        const topic = uniqueName("kip848")
        const groupId = `${topic}-group`
        const env = { KAFKA_CLIENT: "platformatic", KAFKA_CONSUMER_GROUP_PROTOCOL: "consumer" }
        const done = yield* startTogether(Array.from({ length: 2 }, () => ({ topic, groupId, env })))
        assert.strictEqual(
          done.reduce((a, b) => a + b, 0),
          1000,
          `every event handled once: ${done}`
        )
      }),
    240_000
  )
})
