/**
 * The group coordinator's node killed (-9) in the middle of a group's commits: three members as separate processes
 * commit every 200 ms while a producer process sends, and the node leading the group's `__consumer_offsets`
 * partition dies right after one of their commits, so the next ones meet it gone. Another node takes the group
 * over; a member then leaves, so the group also rebalances under the new coordinator.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import * as Cluster from "../../scripts/kafka/cluster.ts"
import { awaitCommittedToEnd, readTopic, uniqueName } from "../support/kafka.ts"
import {
  commitsToLostPartitions,
  handledTwice,
  type Member,
  member,
  orderViolations,
  until
} from "../support/members.ts"
import { coordinatorOf, createReplicated, eventIds, keepLogOnFailure, pacedProducer, producerLines } from "./support.ts"

const distinct = (members: ReadonlyArray<Member>) =>
  new Set(members.flatMap((m) => m.processed.map((r) => `${r.partition}/${r.offset}`)))

describe("the group coordinator killed", () => {
  for (const engine of ["kafkajs", "platformatic"] as const) {
    it.live(
      `${engine}: the coordinator's node killed -9 right after a commit, three members committing every 200 ms: no commit to a lost partition, no record lost, order kept`,
      () =>
        Effect.scoped(
          Effect.gen(function* () {
            const cluster = yield* Cluster.acquire({ nodes: 3 })
            const topic = uniqueName(`coordinator-${engine}`)
            yield* createReplicated(cluster.brokers, topic, 6)
            const groupId = `${topic}-group`
            const env = {
              KAFKA_CLIENT: engine,
              KAFKA_BROKERS: cluster.brokers,
              KAFKA_RECONNECT_BACKOFF_MAX_MS: "1000",
              KAFKA_CONSUMER_TOPIC: topic,
              KAFKA_CONSUMER_GROUP_ID: groupId,
              KAFKA_CONSUMER_WORKERS: "8",
              KAFKA_CONSUMER_SESSION_TIMEOUT_MS: "10000",
              KAFKA_CONSUMER_HEARTBEAT_INTERVAL_MS: "500",
              KAFKA_CONSUMER_COMMIT_INTERVAL_MS: "200",
              HANDLER_DELAY_MS: "1"
            }
            const members = [yield* member("a", env), yield* member("b", env), yield* member("c", env)]
            for (const m of members) yield* keepLogOnFailure(`${topic}-${m.name}`, () => m.stderr)
            const producer = yield* pacedProducer(engine, cluster.brokers, topic, 400)
            yield* until(
              "every member assigned and 2,000 records handled",
              () =>
                members.every((m) => m.events.some((e) => e.kind === "assigned" && e.partitions.length > 0)) &&
                distinct(members).size >= 2_000,
              members
            )
            const coordinator = yield* coordinatorOf(cluster.brokers, groupId)
            // Right after a commit is logged: the next, 200 ms later at most, meets the node gone.
            const commits = () => members.reduce((n, m) => n + m.events.filter((e) => e.kind === "committed").length, 0)
            const before = commits()
            yield* until("a commit", () => commits() > before, members)
            yield* Cluster.kill(cluster, coordinator)
            const killedAt = Date.now()
            const handledAtKill = distinct(members).size
            const survivors = cluster.nodes
              .filter((node) => node.id !== coordinator)
              .map((node) => `127.0.0.1:${node.port}`)
              .join(",")
            // The group goes on under another coordinator: records handled, commits landing again.
            yield* until("2,000 more records handled", () => distinct(members).size >= handledAtKill + 2_000, members)
            const commitsAfter = commits()
            yield* until("commits again", () => commits() > commitsAfter, members)
            const recoveredIn = Date.now() - killedAt
            const next = yield* coordinatorOf(survivors, groupId)
            assert.notStrictEqual(next, coordinator, "another node coordinates the group")
            // A member leaves: the group rebalances under the new coordinator.
            const [a, b, c] = members as [Member, Member, Member]
            a.signal("SIGTERM")
            yield* a.exited
            assert.strictEqual(a.exitCode, 0, `a exits 0 on SIGTERM: ${a.stderr.slice(-1000)}`)
            producer.stop()
            assert.strictEqual(yield* producer.exited, 0, producer.output().stderr.slice(-2000))
            const { acked, failed, begun } = producerLines(producer)
            assert.strictEqual(acked.length + failed.length, begun, "every send begun has an outcome")

            const stored = yield* readTopic(survivors, topic)
            const storedIds = new Set(eventIds(stored))
            assert.deepStrictEqual(
              acked.filter((id) => !storedIds.has(id)),
              [],
              "every acked event is stored"
            )
            yield* awaitCommittedToEnd(survivors, groupId, topic, "120 seconds")
            for (const m of [b, c]) m.signal("SIGTERM")
            for (const m of [b, c]) {
              yield* m.exited
              assert.strictEqual(m.exitCode, 0, `${m.name} exits 0 on SIGTERM: ${m.stderr.slice(-1000)}`)
            }
            const handled = distinct(members)
            const unhandled = stored.filter((r) => !handled.has(`${r.partition}/${r.offset}`))
            assert.strictEqual(unhandled.length, 0, "every stored record handled")
            for (const m of members) {
              assert.strictEqual(commitsToLostPartitions(m), 0, `${m.name}: no commit to a partition it did not own`)
              assert.strictEqual(orderViolations(m), 0, `${m.name}: per-key order within each stretch`)
            }
            const total = members.reduce((n, m) => n + m.processed.length, 0)
            console.log(
              `${engine}, coordinator (node ${coordinator}) killed: node ${next} took over; consumption and commits back ${(recoveredIn / 1000).toFixed(1)} s after the kill; ` +
                `commits that failed and were retried: ${members.map((m) => `${m.name} ${m.commitFailures}`).join(", ")}; ` +
                `${acked.length} acked, ${failed.length} failed, 0 lost; ${stored.length} stored, ${total - handled.size} handled again (at-least-once), ` +
                `${members.reduce((n, m) => n + handledTwice(m), 0)} of them by the same member`
            )
          })
        ),
      300_000
    )
  }
})
