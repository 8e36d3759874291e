import { inject } from "vitest"
import { clientLayer } from "../support/kafka.ts"
import { contractSuite } from "./contract.ts"

const brokers = inject("kafkaBrokers")

// KIP-848's group protocol: the broker assigns partitions and members give up only those that move.
contractSuite(
  "@platformatic/kafka with the consumer group protocol (KIP-848) on a real broker",
  () => clientLayer(brokers, { KAFKA_CLIENT: "platformatic", KAFKA_RECONNECT_BACKOFF_MAX_MS: "1000" }),
  { heartbeats: "background", realBroker: true, groupProtocol: "consumer" }
)
