// Starting a thread. A failure (std::system_error: out of memory, thread limit reached) becomes
// a TransferError naming what could not start, so that callers refuse that one connection or
// operation instead of letting the exception end theirs (or the process). Tests can inject
// such failures.
#pragma once

#include <string>
#include <system_error>
#include <thread>
#include <utility>

#include "mooncake_vllm/types.h"

namespace mooncake_vllm::net {

// Test hook: the next `count` start_thread calls fail as if the system refused the thread.
void inject_thread_start_failures(int count);
bool take_thread_start_failure();

template <typename F>
std::thread start_thread(const std::string& what, F&& body) {
  try {
    if (take_thread_start_failure())
      throw std::system_error(std::make_error_code(std::errc::resource_unavailable_try_again),
                              "injected");
    return std::thread(std::forward<F>(body));
  } catch (const std::system_error& e) {
    throw TransferError("cannot start a thread for " + what + ": " + e.what());
  }
}

}  // namespace mooncake_vllm::net
