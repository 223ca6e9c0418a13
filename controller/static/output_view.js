// The output view: a virtualized list of output lines (issue 13, item 1). Being built.
"use strict";
