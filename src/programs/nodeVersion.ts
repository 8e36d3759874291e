/**
 * The Node.js floor, checked first: an older Node fails later with messages that say nothing about versions. The
 * programs import this before anything else.
 */
const [major = 0, minor = 0] = process.versions.node.split(".").map(Number)
if (major < 22 || (major === 22 && minor < 19)) {
  process.stderr.write(
    `kafka-effect needs Node.js 22.19 or newer (24 LTS recommended); this is ${process.version}. With nvm: nvm install 24 && nvm use 24\n`
  )
  process.exit(1)
}
