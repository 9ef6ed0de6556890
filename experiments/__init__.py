"""absl experiment binaries: flags, config, one call into a library run()."""
