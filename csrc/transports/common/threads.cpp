#include "threads.h"

#include <atomic>

namespace mooncake_vllm::net {

namespace {
std::atomic<int> injected_failures{0};
}

void inject_thread_start_failures(int count) { injected_failures.store(count); }

bool take_thread_start_failure() {
  int left = injected_failures.load();
  while (left > 0)
    if (injected_failures.compare_exchange_weak(left, left - 1)) return true;
  return false;
}

}  // namespace mooncake_vllm::net
