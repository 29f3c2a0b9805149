#pragma once
// idemctl's exit codes.

namespace idemctl {

/// @brief idemctl's exit codes (also listed in `idemctl --help` and docs/operating.md).
enum ExitCode : int {
  exit_ok = 0,
  exit_missing_key = 1,  ///< inspect/forget: the store has no record of the key
  exit_usage = 2,        ///< bad arguments or a bad store url
  exit_unavailable = 3,  ///< the store cannot be reached, or failed
  exit_unsupported = 4,  ///< this build or this store cannot do the operation
  exit_aborted = 5,      ///< forget was not confirmed
};

}  // namespace idemctl
