export * as KafkaConfig from "./Config.ts"
