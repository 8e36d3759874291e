/** What the benchmarks share. */
import { Duration, Option } from "effect"
import * as KafkaJS from "../src/engines/kafkajs/KafkaJS.ts"
import type * as KafkaConfig from "../src/KafkaConfig.ts"

/** Our KafkaClient on `brokers`, with the defaults of the environment's configuration. */
export const clientLayer = (brokers: string) =>
  KafkaJS.layer({
    engine: "kafkajs",
    brokers: brokers.split(","),
    clientId: "bench",
    sasl: Option.none(),
    tls: Option.none(),
    connectionTimeout: Duration.seconds(10),
    requestTimeout: Duration.seconds(30),
    reconnectBackoff: Duration.millis(200),
    reconnectBackoffMax: Duration.seconds(5)
  } satisfies KafkaConfig.ConnectionConfig)
