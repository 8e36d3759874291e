import { inject } from "vitest"
import { clientLayer } from "../support/kafka.ts"
import { contractSuite } from "./contract.ts"

const brokers = inject("kafkaBrokers")

contractSuite(
  "kafkajs on a real broker",
  () => clientLayer(brokers, { KAFKA_CLIENT: "kafkajs", KAFKA_RECONNECT_BACKOFF_MAX_MS: "1000" }),
  {
    heartbeats: "betweenBatches",
    realBroker: true
  }
)
