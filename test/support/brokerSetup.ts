/**
 * Global setup of the `broker` test project: the Kafka broker every broker test talks to.
 *
 * With KAFKA_BROKERS set, the tests use that cluster. Otherwise a real single-node Apache Kafka (KRaft) is
 * started for the run and stopped after it. If it cannot start, the run fails here with the reason; the broker
 * tests are never skipped.
 */
import { Effect } from "effect"
import type { TestProject } from "vitest/node"
import * as Broker from "../../scripts/kafka/broker.ts"

declare module "vitest" {
  interface ProvidedContext {
    /** `host:port[,host:port…]` of the broker under test. */
    readonly kafkaBrokers: string
    /** PID of the broker started for this run; 0 when KAFKA_BROKERS named an external one. */
    readonly kafkaBrokerPid: number
  }
}

export default async function setup(project: TestProject) {
  const external = process.env.KAFKA_BROKERS
  if (external !== undefined && external !== "") {
    console.log(`[kafka] using the broker(s) in KAFKA_BROKERS: ${external}`)
    project.provide("kafkaBrokers", external)
    project.provide("kafkaBrokerPid", 0)
    return
  }
  const startedAt = performance.now()
  const broker = await Effect.runPromise(Broker.start()).catch((error: unknown) => {
    throw new Error(`[kafka] the test broker could not start: ${error instanceof Error ? error.message : error}`)
  })
  const seconds = ((performance.now() - startedAt) / 1000).toFixed(1)
  console.log(
    `[kafka] started Apache Kafka ${Broker.kafkaVersion} (KRaft) at ${broker.brokers}, pid ${broker.pid}, in ${seconds} s; log: ${broker.logFile}`
  )
  project.provide("kafkaBrokers", broker.brokers)
  project.provide("kafkaBrokerPid", broker.pid)
  return async () => {
    await Effect.runPromise(Broker.stop(broker))
    console.log(`[kafka] stopped the broker (pid ${broker.pid})`)
  }
}
