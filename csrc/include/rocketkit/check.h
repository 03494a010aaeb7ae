// Argument checks shared by every entry point of the core.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace rocketkit::detail {

template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

}  // namespace rocketkit::detail

/// Bad input: throws std::invalid_argument ("[function] message"), which Python sees as ValueError.
#define ROCKETKIT_CHECK(cond, fn, ...)                                                       \
  do {                                                                                       \
    if (!(cond))                                                                             \
      throw std::invalid_argument(::rocketkit::detail::concat("[", fn, "] ", __VA_ARGS__)); \
  } while (0)

/// Failure while computing (LAPACK, device): throws std::runtime_error ("[function] message").
#define ROCKETKIT_FAIL(fn, ...) \
  throw std::runtime_error(::rocketkit::detail::concat("[", fn, "] ", __VA_ARGS__))
