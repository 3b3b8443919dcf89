// Missing from the TVM wheel; nothing of it is used here (see io.h).
#pragma once
#include <tvm/support/io.h>
