// The Node.js floor for the npm scripts, in plain JavaScript so that any Node runs it: an older Node would fail on
// `--experimental-strip-types` ("bad option") without saying why.
const [major = 0, minor = 0] = process.versions.node.split(".").map(Number)
if (major < 22 || (major === 22 && minor < 19)) {
  console.error(
    `kafka-effect needs Node.js 22.19 or newer (24 LTS recommended); this is ${process.version}. With nvm: nvm install 24 && nvm use 24 (.nvmrc says 24)`
  )
  process.exit(1)
}
