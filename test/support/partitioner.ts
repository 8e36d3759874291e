import { Partitioners } from "kafkajs"

/** kafkajs' default partitioner (murmur2, as the Java client), asked directly for a topic of `partitions`. */
export const kafkajsPartitionFor = (topic: string, partitions: number) => {
  const partitioner = Partitioners.DefaultPartitioner()
  const partitionMetadata = Array.from({ length: partitions }, (_, partitionId) => ({
    partitionId,
    leader: 1,
    replicas: [1],
    isr: [1],
    offlineReplicas: [],
    partitionErrorCode: 0
  }))
  return (key: string) => partitioner({ topic, partitionMetadata, message: { key, value: null } })
}
