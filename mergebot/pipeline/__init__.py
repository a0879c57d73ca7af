"""One target's work: inputs, merge, the validation gate, publishing. Runs in the daemon's child process."""
